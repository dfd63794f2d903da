"""Model-only throughput: scorer bf16 and 4-bit against transformers and the bf16 GEMM ceiling.

    python benchmarks/e2e.py                      # Llama-3-8B shape, 2048 texts (also: scorer bench)
    python benchmarks/e2e.py --model-shape 70b    # scorer 4-bit alone on a Llama-3-70B shape
See scorer/bench.py for what is measured; figures go to benchmarks/RESULTS.md.
"""

import argparse
import sys

from scorer.bench import DEFAULT_VARIANTS, main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="8b", choices=["8b", "70b"])
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--peers", default="both", choices=["both", "sorted", "none"],
                    help="transformers runs beside scorer: arrival order and length-sorted, sorted only, none")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list, e.g. bf16,int4+compile")
    ap.add_argument("--peers-last", action="store_true", help="time transformers after scorer, not before")
    a = ap.parse_args()
    sys.exit(main(a.model_shape, a.texts, a.max_batch_tokens, a.peers, a.variants, peers_last=a.peers_last))
