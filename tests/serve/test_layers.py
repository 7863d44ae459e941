"""The server's import rules (docs/ARCHITECTURE.md, "The server"), read from the source with
``ast``: each layer imports only the layers the table allows."""

from __future__ import annotations

import ast
from pathlib import Path

import deepwhale.serve

SERVE = Path(deepwhale.serve.__file__).parent
OPERATIONS = {"serve.auth", "serve.audit", "serve.metrics", "serve.stats", "atomic"}
OPERATIONS |= {"serve.ratelimit", "serve.bodypeek"}
SERVING = {"serve.serving", "serve.serving_completions", "serve.serving_chat"}
SERVING |= {"serve.serving_tokenizer", "serve.serving_embeddings", "serve.sse"}
SERVING |= {"serve.serving_responses", "serve.chat_features", "serve.serving_admin"}
# text parsers of model output (reasoning, tool calls): the inference layer's stop hold-back only
PARSERS = {"serve.reasoning", "serve.tool_calls"}
# module (relative to deepwhale/serve) -> what of deepwhale it may import
ALLOWED = {
    "schemas.py": {"serve.schemas_tools", "serve.schemas_guided"},
    "schemas_guided.py": set(),
    "schemas_tools.py": set(),
    "reasoning.py": {"inference.generate"},
    "tool_calls.py": {"inference.generate"},
    "errors.py": {"inference.generate", "serve.schemas"},
    "bridge.py": {"inference.engine", "inference.generate", "serve.errors"} | OPERATIONS,
    "middleware.py": {"serve.errors"} | OPERATIONS,
    "routes/": {"serve", "serve.routes", "serve.schemas"} | SERVING,
    # the admin API: the key store and audit log, no engine
    "serving_admin.py": {"serve.errors"} | OPERATIONS,
}
SERVING_FILES = ("serving.py", "serving_completions.py", "serving_chat.py", "serving_responses.py")
SERVING_FILES += ("chat_features.py",)
for name in (*SERVING_FILES, "serving_tokenizer.py", "serving_embeddings.py"):
    ALLOWED[name] = {"api", "tokenizer", "serve.schemas", "serve.bridge", "serve.errors"}
    ALLOWED[name] |= {"inference.engine", "inference.generate", "inference.sampling"}
    ALLOWED[name] |= (
        {"inference.prompt_logprobs", "inference.guided"} | OPERATIONS | SERVING | PARSERS
    )
ALLOWED["sse.py"] = ALLOWED["serving.py"]


def _imports(path: Path) -> set[str]:
    """``deepwhale.*`` modules imported by ``path``, without the ``deepwhale.`` prefix."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepwhale"):
            out.add(node.module.removeprefix("deepwhale").lstrip("."))
        elif isinstance(node, ast.Import):
            out |= {
                a.name.removeprefix("deepwhale.")
                for a in node.names
                if a.name.startswith("deepwhale.")
            }
    return out


def test_each_server_layer_imports_only_what_the_architecture_allows():
    checked = []
    for path in sorted(SERVE.rglob("*.py")):
        rel = path.relative_to(SERVE).as_posix()
        rule = ALLOWED.get("routes/" if rel.startswith("routes/") else rel)
        if rule is None:
            continue
        extra = _imports(path) - rule
        assert not extra, f"deepwhale/serve/{rel} imports {sorted(extra)}"
        checked.append(rel)
    assert {"schemas.py", "serving.py", "middleware.py", "routes/openai.py"} <= set(checked)


def test_no_server_module_is_over_600_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in SERVE.rglob("*.py")}
    assert max(sizes.values()) <= 600, sizes
