#!/usr/bin/env bash
# Build the deepwhale demo model from the shared corpora with deepwhale's own pipeline:
#   1. train a zh/en byte-level BPE tokenizer (8192 tokens),
#   2. run the Beam data pipeline (clean, langid, dedup, quality, tokenize + pack),
#   3. train the DeepSeek-V3-shaped demo model (about 30 minutes on 2 CPU cores),
#   4. save it in bf16 to deepwhale/assets/deepwhale-demo (`deepwhale generate --model deepwhale-demo`).
# Run from the repository root, with ../shared/data present. Pass --quiet to hide progress bars.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
Q=${1:-}
C=../shared/data/corpus
deepwhale tokenizer train $Q --vocab-size 8192 --out build/demo/tokenizer \
  --input $C/zh/novels/hongloumeng.txt $C/zh/novels/sanguoyanyi.txt $C/mixed/cmn-eng/cmn.txt \
          $C/en/tinyshakespeare/input.txt $C/en/tinystories/tinystories_sample.txt \
  --compare gpt2=../shared/data/tokenizers/gpt2 \
  --compare deepseek-llm=../shared/data/tokenizers/deepseek/ggml-vocab-deepseek-llm.gguf
deepwhale data run $Q --config examples/demo/pipeline.yaml
deepwhale train $Q --config examples/demo/train.yaml
python examples/demo/export.py build/demo/run/final deepwhale/assets/deepwhale-demo
