"""Each peer's DIN, one training step and one inference batch, before and after `fastdin.patch`.

The models are the peers' own (fastdin.bench.peer_models), at a paper-like shape: batch 256,
history 50, attention MLP (64, 16) (RecBole: its defaults, embedding 10 and (256, 256, 256)). A
training step is the peer's loss, backward and an Adam step; inference is an eval forward without
gradients. CPU, one thread; the unpatched and the patched model alternate within every repeat, the
medians are compared within the same run. Rows are printed and written to bench/results/patch_cpu.csv.

    python bench/bench_patch.py                     # backend None: fastdin's default (auto)
    python bench/bench_patch.py --backend reference
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import tempfile
import time
import warnings

import pandas as pd
import torch

import fastdin
from fastdin.bench import peer_models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH, SEQ_LEN = 256, 50


def deepctr():
    model, x, y = peer_models.deepctr_din(BATCH, SEQ_LEN, dim=16, att_activation="Dice", att_hidden=(64, 16),
                                          dnn_hidden=(200, 80), items=1000)
    X, labels = peer_models.deepctr_input(model, x).float(), torch.from_numpy(y).float()
    return model, lambda m: m(X).squeeze(-1), labels


def fuxictr():
    target, history, labels = peer_models.fuxictr_batch(BATCH, SEQ_LEN, items=1000)
    model = peer_models.FuxiDIN(dim=32, items=1000, attention_units=(64, 16), dnn_units=(200, 80))
    return model, lambda m: m(target, history), labels.float()


def rechub():
    x, labels = peer_models.rechub_batch(BATCH, SEQ_LEN, items=1000)
    model = peer_models.rechub_din(dim=32, items=1000, activation="prelu", attention_dims=(64, 16), mlp_dims=(200, 80))
    return model, lambda m: m(x), labels.float()


def recbole():
    from recbole.model.sequential_recommender import DIN

    torch.autograd.set_detect_anomaly(False)  # RecBole 1.2.1 turns it on for the whole process on import

    config, dataset, batches = peer_models.recbole_ml100k(tempfile.mkdtemp(), seq_len=SEQ_LEN, dim=10,
                                                          hidden=(256, 256, 256), batch=BATCH, batches=1)
    inter = batches[0]
    model = DIN(config, dataset)
    return model, lambda m: m.forward(inter[m.USER_ID], inter[m.ITEM_SEQ], inter[m.ITEM_SEQ_LEN], inter[m.POS_ITEM_ID]), \
        inter[model.LABEL_FIELD].float()


PEERS = {"deepctr_torch": deepctr, "fuxictr": fuxictr, "torch_rechub": rechub, "recbole": recbole}


def step_fns(model, forward, labels, logits: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss() if logits else torch.nn.BCELoss()

    def train():
        model.train()
        optimizer.zero_grad()
        loss_fn(forward(model), labels).backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            forward(model)

    return {"train": train, "infer": infer}


def measure(peer: str, backend, repeats: int, calls: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastdin.integrations.PatchWarning)
        model, forward, labels = PEERS[peer]()
        patched = copy.deepcopy(model)
        replaced = fastdin.patch(patched, backend=backend)
    logits = peer == "recbole"  # RecBole's forward gives logits; the others probabilities
    fns = {"peer": step_fns(model, forward, labels, logits), "patched": step_fns(patched, forward, labels, logits)}
    rows = []
    for phase in ("train", "infer"):
        times = {"peer": [], "patched": []}
        for variant in times:  # warm-up
            fns[variant][phase]()
        for _ in range(repeats):
            for variant in times:  # interleaved
                start = time.perf_counter()
                for _ in range(calls):
                    fns[variant][phase]()
                times[variant].append((time.perf_counter() - start) / calls * 1e3)
        peer_ms, patched_ms = statistics.median(times["peer"]), statistics.median(times["patched"])
        rows.append({"peer": peer, "phase": phase, "backend": backend or "default", "batch": BATCH, "seq_len": SEQ_LEN,
                     "replaced": ";".join(r.path for r in replaced), "peer_ms": round(peer_ms, 3),
                     "patched_ms": round(patched_ms, 3), "speedup": round(peer_ms / patched_ms, 3)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="fastdin backend for the patched model (default: fastdin's)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--out", default=os.path.join(RESULTS, "patch_cpu.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for peer in args.peers:
        rows += measure(peer, args.backend, args.repeats, args.calls)
    table = pd.DataFrame(rows)
    table.insert(0, "date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    table["cpu"] = platform.processor() or platform.machine()
    table["torch"] = torch.__version__
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    table.to_csv(args.out, mode="a", header=not os.path.exists(args.out), index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
