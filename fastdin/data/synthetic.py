"""Synthetic click data with planted structure, streamed batch by batch.

The world: `num_categories` categories of `items_per_category` items each (id 0 is padding); the
popularity of categories and of items within a category follows Zipf's law. Each row is a fresh
user with a few interest categories of unequal weight. The user's history mostly holds items of
those interests (a `noise` share comes from anywhere), and has a random length in
[min_history, max_history]. Half the candidates are positives: an item of one of the user's
interests. The others are negatives: an item of another category, sampled by popularity.

Positive and negative candidates come from the same popularity law, so the candidate alone says
little: a model must compare the candidate with the history. Users have several interests and the
positive may be a minor one, so a plain sum of the history blurs it, while attention pooling can
pick out the matching behaviours. This is the case where DIN beats the sum-pooling BaseModel.

Each batch is generated from its own seed (seed, split, batch index), so the same seed gives the
same data, the train and test splits are independent streams, and no data set is held in memory.
"""
from dataclasses import dataclass
from typing import Dict, Iterator

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    num_categories: int = 200
    items_per_category: int = 40
    max_history: int = 30
    min_history: int = 1
    interests_per_user: int = 6
    noise: float = 0.2  # share of history behaviours that come from any category
    zipf_exponent: float = 1.0
    seed: int = 0
    # adds "user_sparse" [B, 1] (the user's strongest interest, as a profile feature would record it)
    # and "dense" [B, 1] (the history length / max_history), for DIN's optional inputs
    user_features: bool = False

    def __post_init__(self):
        for name in ("num_categories", "items_per_category", "max_history", "min_history", "interests_per_user"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_history > self.max_history:
            raise ValueError(f"min_history ({self.min_history}) must not exceed max_history ({self.max_history})")
        if self.interests_per_user >= self.num_categories:
            raise ValueError(
                f"interests_per_user ({self.interests_per_user}) must be below num_categories "
                f"({self.num_categories}), so that negatives have categories to come from"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must lie in [0, 1], got {self.noise}")


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One index per row of probs [N, K] (rows sum to 1), by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), probs.shape[1] - 1)


class SyntheticDIN:
    """The synthetic world of `SyntheticConfig`; `batch` and `stream` generate the click data.

    Vocabulary sizes for `fastdin.DIN` (padding id 0 included): `num_items`, `num_categories`.
    """

    def __init__(self, config: SyntheticConfig = SyntheticConfig()):
        self.config = config
        c = config
        self.num_items = 1 + c.num_categories * c.items_per_category
        self.num_categories = 1 + c.num_categories
        world = np.random.default_rng([c.seed, len(SPLITS)])  # a stream apart from every split's batches
        # category ids 1..C get Zipf popularity in a random order, so id says nothing about popularity
        self.category_popularity = _zipf(c.num_categories, c.zipf_exponent)[world.permutation(c.num_categories)]
        # within each category, item rank r (id (cat - 1) * items_per_category + r + 1) has Zipf popularity
        self.item_rank_popularity = _zipf(c.items_per_category, c.zipf_exponent)

    def vocab_sizes(self) -> Dict[str, int]:
        """The keyword arguments `fastdin.DIN` needs for its embedding tables and optional inputs."""
        sizes = {"num_items": self.num_items, "num_categories": self.num_categories}
        if self.config.user_features:
            sizes.update(user_sparse_sizes=(self.num_categories,), num_dense=1)
        return sizes

    def category_of(self, items: Tensor) -> Tensor:
        """The category id of each item id (0 for padding)."""
        return torch.where(items > 0, (items - 1) // self.config.items_per_category + 1, torch.zeros_like(items))

    def _items_in(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        ranks = rng.choice(self.config.items_per_category, size=categories.shape, p=self.item_rank_popularity)
        return (categories - 1) * self.config.items_per_category + ranks + 1

    def batch(self, split: str, index: int, batch_size: int, with_interests: bool = False) -> Dict[str, Tensor]:
        """Batch number `index` of `split`: a dict of CPU tensors as `fastdin.DIN` takes them.

        with_interests adds "interests" [B, K] (the users' interest categories), for tests.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or index < 0:
            raise ValueError(f"batch_size must be positive and index non-negative, got {batch_size} and {index}")
        c = self.config
        rng = np.random.default_rng([c.seed, SPLITS.index(split), index])
        n_cat, k, t_max = c.num_categories, c.interests_per_user, c.max_history

        # interests: K distinct categories by popularity (Gumbel top-k), with unequal weights
        gumbel = np.log(self.category_popularity) + rng.gumbel(size=(batch_size, n_cat))
        interests = np.argsort(-gumbel, axis=1)[:, :k] + 1
        interest_weights = rng.dirichlet(np.ones(k), size=batch_size)

        lengths = rng.integers(c.min_history, t_max + 1, size=batch_size)
        cdf = np.cumsum(interest_weights, axis=1)
        which = np.minimum((cdf[:, None, :] <= rng.random((batch_size, t_max, 1))).sum(-1), k - 1)
        hist_categories = np.take_along_axis(interests, which, axis=1)
        noisy = rng.random((batch_size, t_max)) < c.noise
        random_categories = rng.choice(n_cat, size=(batch_size, t_max), p=self.category_popularity) + 1
        hist_categories = np.where(noisy, random_categories, hist_categories)
        hist_items = self._items_in(rng, hist_categories)
        padding = np.arange(t_max)[None, :] >= lengths[:, None]
        hist_categories[padding] = 0
        hist_items[padding] = 0

        label = rng.random(batch_size) < 0.5
        positive_category = interests[np.arange(batch_size), _sample_rows(rng, interest_weights)]
        # negatives: by popularity among the categories that are not the user's interests
        not_interest = np.ones((batch_size, n_cat + 1), dtype=bool)
        np.put_along_axis(not_interest, interests, False, axis=1)
        negative_probs = self.category_popularity[None, :] * not_interest[:, 1:]
        negative_category = _sample_rows(rng, negative_probs) + 1
        category = np.where(label, positive_category, negative_category)
        item = self._items_in(rng, category)

        out = {
            "item": torch.from_numpy(item),
            "category": torch.from_numpy(category),
            "hist_items": torch.from_numpy(hist_items),
            "hist_categories": torch.from_numpy(hist_categories),
            "lengths": torch.from_numpy(lengths),
            "label": torch.from_numpy(label.astype(np.float32)),
        }
        if c.user_features:
            strongest = np.take_along_axis(interests, interest_weights.argmax(1)[:, None], axis=1)
            out["user_sparse"] = torch.from_numpy(strongest)
            out["dense"] = torch.from_numpy((lengths / t_max).astype(np.float32)[:, None])
        if with_interests:
            out["interests"] = torch.from_numpy(interests)
        return out

    def stream(self, split: str, num_rows: int, batch_size: int) -> "BatchStream":
        """The first `num_rows` rows of `split` in batches (the last one may be smaller); re-iterable.

        Batch i is `batch(split, i, batch_size)`, so the rows depend on batch_size as well as on the seed.
        """
        return BatchStream(self, split, num_rows, batch_size)


class BatchStream:
    """A re-iterable sequence of batches of one split, generated on the fly (see `SyntheticDIN.stream`)."""

    def __init__(self, data: SyntheticDIN, split: str, num_rows: int, batch_size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"num_rows and batch_size must be positive, got {num_rows} and {batch_size}")
        self.data, self.split, self.num_rows, self.batch_size = data, split, num_rows, batch_size

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        for index in range(len(self)):
            size = min(self.batch_size, self.num_rows - index * self.batch_size)
            # a short last batch is a prefix of a full one, so a row's content never depends on num_rows
            batch = self.data.batch(self.split, index, self.batch_size)
            yield batch if size == self.batch_size else {name: t[:size] for name, t in batch.items()}
