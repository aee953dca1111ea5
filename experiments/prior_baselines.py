"""Label-prior baselines on the grid's seeded test users, for docs/results.md.

    .venv/bin/python experiments/prior_baselines.py   # after `userllm experiment experiments/movielens100k.yaml`

favorite_genre: always answer the most frequent label of the train split; next_item: the 10 most frequent
train targets, most frequent first (popularity). Same test users as every grid cell.
"""

import json
from collections import Counter

from userllm.data.dataset import PreparedDataset
from userllm.llm.backbone import load_backbone
from userllm.tasks.data import TaskData

ds = PreparedDataset("outputs/ml-100k")
tok = load_backbone().tokenizer
users = json.loads(open("runs/movielens100k/favorite_genre/xattn-h50/eval_users-30-seed0.json").read())
for L in (50, 100, 200):
    data = TaskData(ds, tok, task="favorite_genre", method="userllm", max_history=L)
    test = [e.answer for e in data.examples("test", users)]
    top = Counter(e.answer for e in data.examples("train")).most_common(1)[0][0]
    accuracy = sum(a == top for a in test) / len(test)
    print(f"favorite_genre h{L}: always '{top}' accuracy {accuracy:.3f}; test labels {Counter(test).most_common(3)}")
data = TaskData(ds, tok, task="next_item", method="userllm", max_history=50)
top10 = [t for t, _ in Counter(e.answer for e in data.examples("train")).most_common(10)]
test = [e.answer for e in data.examples("test", users)]
print(f"next_item popularity: recall@1 {sum(a == top10[0] for a in test) / len(test):.3f}, "
      f"recall@10 {sum(a in top10 for a in test) / len(test):.3f}")
