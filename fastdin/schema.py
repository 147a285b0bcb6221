"""The feature schema of a DIN model: which fields a batch holds and how DIN embeds each.

A schema names:

- `candidates`: the candidate's sparse fields that have a behaviour sequence (item, category, shop...);
- `sequences`: behaviour-sequence fields, each paired with the candidate field whose embedding
  table it shares (hist_items -> item). The attention unit sees, per position, the concatenation of
  the paired fields' embeddings, and the query is the concatenation of the candidate fields' embeddings
  in the same order;
- `sparse`: user and context fields (one id per row), each with its own table;
- `multi_hot`: fields with several ids per row ([B, K], 0 = padding), pooled by "sum" or "mean";
- `dense`: float features of width `dim`.

Every sparse table keeps id 0 for padding, so `vocab_size` counts it. The embedding dimension is
per field (`embed_dim`, else the schema's default); a sequence field has no dimension of its own,
because it looks up its candidate's table.

A batch for a schema holds one tensor per field under the field's name: candidates [B], sequences
[B, T] (all of one T), sparse [B], multi-hot [B, K], dense [B, dim] (or [B] for dim 1). Sparse fields
may also come packed as "user_sparse" [B, F] in schema order. The positions of the history come from
"lengths" [B], a bool "mask" [B, T], or, with neither, from the padding id 0 of the first sequence.
`padding="left"` reads lengths as counting from the end (Keras `pad_sequences`' default).

Schemas round-trip through `to_dict` / `from_dict` (JSON and YAML files through `load_schema`).
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

POOLINGS = ("sum", "mean")
PADDINGS = ("right", "left")


def _check_name(kind: str, name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} field name must be a non-empty string, got {name!r}")


def _check_positive_int(what: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


@dataclass
class SparseField:
    """A field of one id per row, with its own embedding table of `vocab_size` rows (id 0 = padding)."""
    name: str
    vocab_size: int
    embed_dim: Optional[int] = None

    def __post_init__(self):
        _check_name("sparse", self.name)
        # id 0 is padding, so a table needs at least one more row to hold a real id
        _check_positive_int(f"vocab_size of field {self.name!r} (id 0 is padding, so at least 2)", self.vocab_size, 2)
        if self.embed_dim is not None:
            _check_positive_int(f"embed_dim of field {self.name!r}", self.embed_dim)


@dataclass
class SequenceField:
    """A behaviour sequence [B, T] that shares the embedding table of candidate field `target`."""
    name: str
    target: str

    def __post_init__(self):
        _check_name("sequence", self.name)
        _check_name(f"target of sequence {self.name!r}:", self.target)


@dataclass
class MultiHotField(SparseField):
    """Several ids per row [B, K] (0 = padding), pooled by "sum" or "mean" over the non-padding ids."""
    pooling: str = "sum"

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling of multi-hot field {self.name!r} must be one of {POOLINGS}, got {self.pooling!r}")


@dataclass
class DenseField:
    """A float feature of width `dim` ([B, dim], or [B] when dim is 1)."""
    name: str
    dim: int = 1

    def __post_init__(self):
        _check_name("dense", self.name)
        _check_positive_int(f"dim of dense field {self.name!r}", self.dim)


@dataclass
class FeatureSchema:
    candidates: List[SparseField]
    sequences: List[SequenceField]
    sparse: List[SparseField] = field(default_factory=list)
    multi_hot: List[MultiHotField] = field(default_factory=list)
    dense: List[DenseField] = field(default_factory=list)
    embed_dim: int = 16
    padding: str = "right"

    def __post_init__(self):
        _check_positive_int("embed_dim", self.embed_dim)
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if not self.sequences:
            raise ValueError("a DIN schema needs at least one behaviour-sequence field")
        names = [f.name for group in (self.candidates, self.sequences, self.sparse, self.multi_hot, self.dense)
                 for f in group]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"field names must be unique, got {repeated} more than once")
        reserved = {"lengths", "mask", "label", "user_sparse"} & set(names)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are batch keys fastdin uses itself; rename the field")
        candidates = {f.name for f in self.candidates}
        for seq in self.sequences:
            if seq.target not in candidates:
                raise ValueError(f"sequence {seq.name!r} pairs with {seq.target!r}, which is not a candidate field "
                                 f"(candidates: {sorted(candidates)})")
        paired = {seq.target for seq in self.sequences}
        unpaired = sorted(candidates - paired)
        if unpaired:
            raise ValueError(f"candidate fields {unpaired} have no behaviour sequence; declare them as sparse fields")
        if len(paired) != len(self.sequences):
            raise ValueError("each candidate field pairs with one sequence field")

    # -- dimensions

    def dim_of(self, f: SparseField) -> int:
        return f.embed_dim or self.embed_dim

    def pairs(self) -> List[Tuple[SequenceField, SparseField]]:
        """(sequence, candidate) in sequence order: the order of the attention's concatenation."""
        by_name = {f.name: f for f in self.candidates}
        return [(seq, by_name[seq.target]) for seq in self.sequences]

    @property
    def behaviour_dim(self) -> int:
        """The width of one behaviour (and of the query): the paired fields' dimensions summed."""
        return sum(self.dim_of(c) for _, c in self.pairs())

    @property
    def top_features(self) -> int:
        """The width of the top MLP's input: sparse, multi-hot, candidate, interest, dense."""
        return (sum(self.dim_of(f) for f in self.sparse) + sum(self.dim_of(f) for f in self.multi_hot)
                + 2 * self.behaviour_dim + sum(f.dim for f in self.dense))

    # -- (de)serialisation

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "FeatureSchema":
        if not isinstance(data, dict):
            raise TypeError(f"a schema must be a mapping, got {type(data).__name__}")
        known = {"candidates", "sequences", "sparse", "multi_hot", "dense", "embed_dim", "padding"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown schema keys {unknown}; expected some of {sorted(known)}")
        kinds = {"candidates": SparseField, "sequences": SequenceField, "sparse": SparseField,
                 "multi_hot": MultiHotField, "dense": DenseField}
        kwargs = {k: v for k, v in data.items() if k not in kinds}
        for key, kind in kinds.items():
            entries = data.get(key) or []
            if not isinstance(entries, list):
                raise TypeError(f"schema key {key!r} must be a list of fields, got {type(entries).__name__}")
            try:
                kwargs[key] = [e if isinstance(e, kind) else kind(**e) for e in entries]
            except TypeError as error:
                raise ValueError(f"schema key {key!r}: {error}") from None
        return cls(**kwargs)

    @classmethod
    def two_field(cls, num_items: int, num_categories: int, embed_dim: int = 16,
                  user_sparse_sizes=(), num_dense: int = 0, padding: str = "right") -> "FeatureSchema":
        """The schema of `DIN(num_items, num_categories, ...)`: item and category with their histories,
        user fields "user_0", ... (a batch may pack them as "user_sparse" [B, F]) and one dense field "dense"."""
        return cls(
            candidates=[SparseField("item", num_items), SparseField("category", num_categories)],
            sequences=[SequenceField("hist_items", "item"), SequenceField("hist_categories", "category")],
            sparse=[SparseField(f"user_{i}", size) for i, size in enumerate(user_sparse_sizes)],
            dense=[DenseField("dense", num_dense)] if num_dense else [],
            embed_dim=embed_dim, padding=padding,
        )


def load_schema(path: Union[str, Path]) -> FeatureSchema:
    """A schema from a .json, .yaml or .yml file (the keys of `FeatureSchema.to_dict`)."""
    return FeatureSchema.from_dict(read_mapping(path))


def read_mapping(path: Union[str, Path]) -> dict:
    """The mapping in a JSON or YAML file, with the file named in any error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only needed for YAML files

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}, column {error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
