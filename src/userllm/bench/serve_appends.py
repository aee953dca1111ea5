"""Single-event appends to ``userllm serve`` alone: the appends row of ``userllm bench serve`` without its
chat levels (~1.5 min instead of ~15), so that two versions of the server can be compared side by side.

    python -m userllm.bench.serve_appends [--run runs/bench-serve/runs/userllm] [--repeat 2]
    # another commit's server, same machine:  git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/src python -m userllm.bench.serve_appends

The run is the User-LLM run ``userllm bench serve`` trained (200 events of history; trained here, User-LLM
only, when missing). Per repeat: a fresh SQLite store holding MovieLens-100K's timelines, a ``userllm serve
--weights int4`` process, one chat per user with >= 200 events (warm cache), then 16 keep-alive clients
appending single events for 10 s, and one chat per client 1.5 s later: how many found their context
already refreshed (:func:`userllm.bench.serve.appends`).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from userllm.bench.serve import appends, free_port, level, start, train_runs
from userllm.data.dataset import PreparedDataset
from userllm.serve.store import EventStore, import_dataset

DEFAULT_RUN = Path("runs/bench-serve/runs/userllm")  # where userllm bench serve trains its User-LLM run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=Path("outputs/ml-100k"))
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    ds = PreparedDataset(args.dataset)
    if not (args.run / "model" / "userllm.safetensors").exists():
        if args.run != DEFAULT_RUN:
            raise SystemExit(f"{args.run}: no trained run there (userllm train's output; leave --run out to train one)")
        args.run = train_runs(DEFAULT_RUN.parent.parent, args.dataset, 200, "smollm2-135m", ("userllm",))["userllm"]
    users = ds.sequences.filter(ds.sequences.get_column("length") >= 200).get_column("user_id").to_list()
    items = ds.items.get_column("item_id").to_list()
    db = args.run.parent / "appends.db"
    for k in range(args.repeat):
        db.unlink(missing_ok=True)
        import_dataset(EventStore(f"sqlite:///{db}"), ds)
        port = free_port()
        proc = start(args.run, f"sqlite:///{db}", port, 8, "int4")
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(level(base, f"userllm-{args.run.name}", users, 4, len(users), 1))
            a = asyncio.run(appends(base, users, items, args.seconds, per_request=1))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(
            f"repeat {k + 1}: {a['events_per_s']:,.0f} events/s (target >= 1,000), "
            f"{a['chats_after_with_current_context']} of {a['chats_after']} contexts current {a['chats_after_s']:g} s later"
        )


if __name__ == "__main__":
    main()
