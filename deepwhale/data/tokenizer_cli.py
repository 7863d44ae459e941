"""``deepwhale tokenizer train``: train a DeepSeek-style byte-level BPE and report compression;
``deepwhale tokenizer extend``: add a domain dictionary's terms to a model's vocabulary
(:mod:`deepwhale.checkpoint.vocab`).

Wired into ``deepwhale/cli.py`` as ``app.add_typer(tokenizer_app, name="tokenizer")``. Only
typer and the standard library are imported at module level; the work is in
:mod:`deepwhale.data.bpe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

tokenizer_app = typer.Typer(
    help="Train byte-level BPE tokenizers, measure their compression, extend a vocabulary.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@tokenizer_app.callback()
def _group() -> None:
    """Train byte-level BPE tokenizers, measure their compression, extend a vocabulary."""


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", highlight=False, markup=True
    )
    raise typer.Exit(2)


@tokenizer_app.command("train")
def train(
    input: Annotated[
        list[Path],
        typer.Option(
            "--input",
            "-i",
            help="UTF-8 text file (repeat the option, or list more files after it). BOM and "
            "CRLF are handled.",
        ),
    ],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Vocabulary size incl. 256 bytes and specials.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    more: Annotated[
        list[Path] | None, typer.Argument(help="More input files.", show_default=False)
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(help="Fraction of each file's tail held out of training for evaluation."),
    ] = 0.1,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="[NAME=]PATH of a tokenizer to compare: a .gguf vocabulary, a folder with "
            "tokenizer.json, or a folder with GPT-2 vocab.json + merges.txt. Repeatable.",
        ),
    ] = None,
    min_frequency: Annotated[int, typer.Option(help="Merge pairs seen at least this often.")] = 2,
    bos_token: Annotated[str, typer.Option(help="BOS token.")] = "<｜begin▁of▁sentence｜>",
    eos_token: Annotated[str, typer.Option(help="EOS token.")] = "<｜end▁of▁sentence｜>",
    pad_token: Annotated[str, typer.Option(help="PAD token.")] = "<｜▁pad▁｜>",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no table.")] = False,
) -> None:
    """Train a byte-level BPE (DeepSeek-V3-style pre-tokenizer: digits in groups of 3, CJK
    runs isolated from Latin words) and write tokenizer.json, tokenizer_config.json and
    compression.json (UTF-8 bytes per token on the held-out zh/en text, also for --compare)."""
    from deepwhale.data import bpe

    def say(message: str) -> None:
        if not quiet:
            typer.echo(message, err=True)

    try:
        special = bpe.SpecialTokens(bos_token, eos_token, pad_token)
        corpus = bpe.Corpus([*input, *(more or [])], holdout=holdout)
        references = []
        for spec in compare or []:
            say(f"loading reference tokenizer {spec}")
            references.append(bpe.load_reference(spec))
        say(f"training a {vocab_size:,}-token BPE on {len(corpus.paths)} file(s)")
        tok = bpe.train_bpe(corpus, vocab_size, special, min_frequency, show_progress=not quiet)
        folder = bpe.save_tokenizer(tok, out, special)
        table: dict = {"heldout_bytes": {}, "rows": []}
        if any(corpus.heldout.values()):
            say("measuring bytes per token on the held-out text")
            table = bpe.compression_table({"ours": tok, **dict(references)}, corpus.heldout)
        table["train_bytes"] = corpus.train_bytes
        table["inputs"] = [str(p) for p in corpus.paths]
        table["holdout"] = holdout
        from deepwhale.atomic import write_json

        write_json(folder / "compression.json", table)
    except (bpe.BPEError, OSError) as exc:
        _fail(str(exc))
        return
    if not quiet:
        print(f"wrote {folder / 'tokenizer.json'} ({tok.get_vocab_size():,} tokens)")
        if table["rows"]:
            print(bpe.format_table(table))
        else:
            print("no held-out text (holdout=0): compression not measured")


@tokenizer_app.command("extend")
def extend(
    model: Annotated[
        str, typer.Option("--model", "-m", help="HF model folder (or a bundled model's name).")
    ],
    dictionary: Annotated[
        Path, typer.Option("--dict", help="Domain dictionary (.yaml/.csv, `deepwhale dict`).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (a new HF folder).")],
    all_forms: Annotated[
        bool,
        typer.Option(
            "--all-forms", help="Add the synonyms too, not only the terms and preferred forms."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Add the dictionary's terms (and preferred forms) to the model's tokenizer as tokens and
    grow embed_tokens / lm_head: each new row is the mean of the rows of the sub-tokens the old
    tokenizer splits the term into. Writes an HF folder that deepwhale and transformers load;
    text without the terms encodes exactly as before."""
    from deepwhale.checkpoint.hub import CheckpointError, resolve_checkpoint
    from deepwhale.checkpoint.vocab import extend_vocabulary
    from deepwhale.dictionary import DictionaryError, load_dictionary

    try:
        d = load_dictionary(dictionary)
        folder = resolve_checkpoint(model) if not Path(model).is_dir() else Path(model)
        terms = d.forms() if all_forms else d.tokens()
        result = extend_vocabulary(folder, terms, out)
    except (DictionaryError, CheckpointError, OSError, ImportError) as exc:
        _fail(str(exc))
        return
    if not quiet:
        print(
            f"wrote {result.out}: {len(result.added)} token(s) added, "
            f"{len(result.skipped)} already single tokens, vocab_size "
            f"{result.old_vocab_size} -> {result.new_vocab_size}"
            f" ({'tied' if result.tied else 'untied'} lm_head)"
        )
