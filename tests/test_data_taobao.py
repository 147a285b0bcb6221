"""The Taobao UserBehavior.csv loader on a small file in the real format, with MIMN's protocol."""
import numpy as np
import pytest

from fastdin.data import DataFileError, load


def write_log(path, users=40, seed=0):
    rng = np.random.default_rng(seed)
    lines, truth = [], {}
    for user in range(1, users + 1):
        n = int(rng.integers(2, 9))
        times = np.sort(rng.choice(np.arange(1_511_000_000, 1_512_000_000), n, replace=False))
        items = rng.integers(100, 130, n)
        order = rng.permutation(n)  # the file is not in time order
        for i in order:
            lines.append(f"{user},{items[i]},{items[i] % 7 + 1000},{rng.choice(['pv', 'buy', 'cart', 'fav'])},{times[i]}")
        truth[str(user)] = (items.tolist(), times.tolist())
    path.write_text("\n".join(lines) + "\n")
    return truth


def test_protocol(tmp_path):
    truth = write_log(tmp_path / "UserBehavior.csv")
    loaded = load("taobao", tmp_path, seed=2, max_len=4)
    vocab = loaded.vocabulary
    seen_users = set()
    last_times = {u: t[-1] for u, (_, t) in truth.items()}
    split_time = sorted(last_times.values())[int(len(last_times) * 0.7)]
    for split, samples in (("train", loaded.train), ("test", loaded.test)):
        for i in range(len(samples)):
            user = loaded.user_names.decode("user", [samples.users[i]])[0]
            assert user not in seen_users  # one row per user
            seen_users.add(user)
            items, times = truth[user]
            s, n = samples.hist_start[i], samples.hist_len[i]
            hist = [int(t) for t in vocab.decode("item", samples.sequences["hist_items"][s:s + n])]
            assert hist == items[:-1][-4:]  # the earlier behaviours by time, the last max_len of them
            target = int(vocab.decode("item", [samples.candidates["item"][i]])[0])
            category = int(vocab.decode("category", [samples.candidates["category"][i]])[0])
            assert category == target % 7 + 1000  # the category of the (possibly replaced) target
            if samples.labels[i] == 1:
                assert target == items[-1]
            else:
                assert target != items[-1]
            assert (last_times[user] > split_time) == (split == "test")  # split by time
    assert seen_users == set(truth)
    labels = np.concatenate([loaded.train.labels, loaded.test.labels])
    assert 0.2 < labels.mean() < 0.8  # replaced half the time


@pytest.mark.parametrize("text, words", [
    ("1,2,3,pv,1511000000\n1,2,x,pv,1511000001\n", r"line 2, column 3 \(category\): expected an integer category"),
    ("1,2,3,pv\n", r"line 1: expected 5 columns"),
    ("", "the file is empty"),
])
def test_bad_files(tmp_path, text, words):
    (tmp_path / "UserBehavior.csv").write_text(text)
    with pytest.raises(DataFileError, match=words):
        load("taobao", tmp_path / "UserBehavior.csv")
