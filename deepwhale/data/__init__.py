"""Data pipeline on Apache Beam: raw text in, packed token shards out.

Modules (each block: documents in, documents out, kept/dropped counted by reason):

    config.py    YAML schema -> typed dataclasses, errors that name the key
    stages.py    the stage registry: name -> params, check, Beam transform (plugins too)
    readers.py   text / jsonl / parquet / novel / poetry / pairs sources
    clean.py     ftfy + NFKC + control characters, OpenCC t2s, lingua language tags
    dedup.py     exact (hash + GroupByKey) and MinHash LSH (bands + union-find) dedup
    quality.py   Gopher / C4 heuristics that work for CJK (jieba words)
    lm.py        perplexity scoring and filtering with a reference LM
    augment.py   augmentation strategies (registry) and the Augment DoFn
    bpe.py       byte-level BPE tokenizer training
    pack.py      tokenize, pack and write shards (shards.py: the format and the reader)
    report.py    report.json + perplexity histogram
    pipeline.py  batch and streaming pipelines; ``run(config)``
    cli.py       ``deepwhale data run``

Beam is imported by the modules that need it, never by this package itself.
"""
