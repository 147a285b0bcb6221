"""What the time-ordered logs (Amazon, MovieLens, RecBole, Taobao) share: sort, encode, draw negatives."""
from typing import Optional, Tuple

import numpy as np

from fastdin.data.vocabulary import Vocabulary


def encode_log(vocabulary: Optional[Vocabulary], users, items, categories) -> Tuple[Vocabulary, Vocabulary, np.ndarray, np.ndarray, np.ndarray]:
    """(vocabulary, users' vocabulary, user, item, category indices); a new vocabulary is fitted when none is given.

    With a given vocabulary (a checkpoint's), unseen tokens become 0; the users, which are no model
    input, are then encoded on their own so that GAUC still tells them apart.
    """
    if vocabulary is None:
        vocabulary = Vocabulary()
        vocabulary.fit("item", items)
        vocabulary.fit("category", categories)
    users_own = Vocabulary()
    users_own.fit("user", users)
    return (vocabulary, users_own, users_own.encode("user", users), vocabulary.encode("item", items),
            vocabulary.encode("category", categories))


def time_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The permutation that sorts rows by user, then time, keeping the file order among ties."""
    return np.lexsort((np.arange(len(users)), times, users))


def negatives_not_in(users: np.ndarray, seen_users: np.ndarray, seen_items: np.ndarray, num_items: int,
                     rng: np.random.Generator, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """One item in [1, num_items) per entry of `users`, uniformly among the items that user never had.

    (seen_users, seen_items) lists every (user, item) pair of the log. exclude [len(users)], if given,
    is one more item per entry to avoid. Redraws until no draw collides, as the reference scripts do.
    """
    if num_items < 2:
        raise ValueError("negative sampling needs at least one item")
    width = np.int64(num_items)
    seen = np.unique(seen_users.astype(np.int64) * width + seen_items)
    keys_of_user = users.astype(np.int64) * width
    out = rng.integers(1, num_items, size=len(users))
    todo = np.arange(len(users))
    for _ in range(1000):
        key = keys_of_user[todo] + out[todo]
        pos = np.minimum(np.searchsorted(seen, key), max(len(seen) - 1, 0))
        bad = (seen[pos] == key) if len(seen) else np.zeros(len(todo), bool)
        if exclude is not None:
            bad |= out[todo] == exclude[todo]
        todo = todo[bad]
        if not len(todo):
            return out
        out[todo] = rng.integers(1, num_items, size=len(todo))
    raise ValueError("could not draw negatives: some users have had (nearly) every item")


def category_of_items(num_items: int, items: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """[num_items]: the category of each item index (the first seen; 0 for items never seen)."""
    table = np.zeros(num_items, np.int64)
    unique, first = np.unique(items, return_index=True)
    table[unique] = categories[first]
    return table
