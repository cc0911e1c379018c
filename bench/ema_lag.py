"""How far the EMA of the weights lags the weights themselves over a run: held-out nats per token
of genforge's autoregressive transformer, raw and averaged (`train.ema_decay`'s EMA, with its
warm-up), at checkpoints along one run of the family's defaults (AdamW 2e-4 (0.9, 0.95),
weight decay 0.01, clipping 1, batch 128, constant learning rate) on bench/peers.py's data and
tokenizer (a 200-step VQGAN, trained here in-process first).

    python bench/ema_lag.py [--steps 2400] [--at 300 600 1000 1500 2000 2400] [--decay 0.999]
                            [--out bench/results/ema-lag.json]

Needs ../shared/data/fashion-mnist.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import peers  # noqa: E402
from common import ROOT, report, write_report  # noqa: E402
from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri  # noqa: E402
from orchestrator.inprocess import run_untracked  # noqa: E402
from orchestrator.storage import open_storage  # noqa: E402
from references import Batches, descend, nats_per_token  # noqa: E402
from workers.autoregressive.transformer import Transformer  # noqa: E402
from workers.nn.ema import EMA  # noqa: E402


def tokenized(workdir: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(training codes, held-out codes, codebook size) of bench/peers.py's AR tokenizer."""
    spec = {"experiment": "ema-lag",
            "defaults": {"data": peers.DATA, "resources": {"cpus": peers.THREADS}},
            "jobs": peers.ar_jobs(seed, 1)[:1]}
    uri = run_untracked(workdir, spec)["tokenizer"][0]["checkpoint"]
    ae = peers.first_stage(load_checkpoint(*resolve_checkpoint_uri(uri)))
    train, heldout = peers.staged(open_storage(f"file://{workdir / 'store'}"))
    return peers.encode(ae, train), peers.encode(ae, heldout), ae.bottleneck.codebook_size


def lag(codes: torch.Tensor, held: torch.Tensor, vocab: int, steps: int, at: list[int],
        decay: float, seed: int) -> list[dict]:
    """[{step, raw, ema, seconds}] at each step of `at`: nats per token over `held`."""
    torch.manual_seed(seed)
    net = Transformer(vocab_size=vocab, seq_len=codes.shape[1])  # the family's default shape
    ema = EMA(net, decay=decay)
    opt = torch.optim.AdamW(net.parameters(), lr=peers.AR_RECIPE["lr"],
                            betas=peers.AR_RECIPE["betas"],
                            weight_decay=peers.AR_RECIPE["weight_decay"])
    batches, rows, start = Batches(codes, peers.AR_RECIPE["batch_size"], seed), [], time.time()
    for step in range(1, steps + 1):
        net.train()
        descend(opt, net.loss(batches.next()), peers.AR_RECIPE["grad_clip"])
        ema.update(net)
        if step in at:
            net.eval()
            rows.append({"step": step, "raw": nats_per_token(net.logits, held),
                         "ema": nats_per_token(ema.module.logits, held),
                         "seconds": time.time() - start})
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--at", type=int, nargs="+", default=[300, 600, 1000, 1500, 2000, 2400])
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ema-lag.json"))
    args = parser.parse_args()
    torch.set_num_threads(peers.THREADS)
    with tempfile.TemporaryDirectory(prefix="genforge-ema-lag-") as tmp:
        codes, held, vocab = tokenized(Path(tmp), args.seed)
    rows = lag(codes, held, vocab, args.steps, sorted(set(args.at)), args.decay, args.seed)
    write_report(args.out, report("ema_lag", peers.THREADS, data=peers.DATA, decay=args.decay,
                                  seed=args.seed, heldout_codes=list(held.shape), points=rows))


if __name__ == "__main__":
    main()
