"""The taxonomy entry schema: one YAML file per method under `taxonomy/`, the file name is the id.

Vocabulary fields (principle, dimensions, training, phase, granularity, budget_policy,
benchmark_category) take their allowed values from `taxonomy/vocabulary.yaml`, which defines each
value; this module reads that file so the schema and the site never disagree. The JSON Schema export
(`taxonomy/schema.json`, written by `kvatlas schema`) lets editors validate as you type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from reference_impls.atlas.paths import taxonomy_dir

__all__ = ["Entry", "Result", "VOCAB", "load_vocabulary", "ARXIV_RE", "ID_RE"]

ARXIV_RE = r"^\d{4}\.\d{4,5}$"  # new-style arXiv ids (2007 on), without version suffix
ID_RE = r"^[a-z0-9][a-z0-9-]*[a-z0-9]$"


def load_vocabulary(path: Path | None = None) -> dict[str, dict[str, str]]:
    """The controlled vocabularies: {field: {value: definition}}."""
    path = path or taxonomy_dir() / "vocabulary.yaml"
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


VOCAB = load_vocabulary()


def _enum(field: str) -> Any:
    # A Literal per vocabulary, so the JSON Schema lists the allowed values for editors.
    return Literal.__getitem__(tuple(VOCAB[field]))


Principle = _enum("principle")
Dimension = _enum("dimensions")
Training = _enum("training")
Phase = _enum("phase")
Granularity = _enum("granularity")
BudgetPolicy = _enum("budget_policy")
BenchmarkCategory = _enum("benchmark_category")

_STRICT = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True)


class Result(BaseModel):
    """One number the paper reports, with where it comes from."""

    model_config = _STRICT

    model: str = Field(min_length=1, description="Model evaluated, e.g. Llama-2-7B")
    benchmark: str = Field(min_length=1, description="Benchmark or task, e.g. LongBench (avg)")
    metric: str = Field(min_length=1, description="Metric, e.g. accuracy, F1, perplexity")
    compression: str = Field(min_length=1, description="Setting, e.g. '2-bit', '20% KV budget', '4x'")
    value: Union[float, int] = Field(description="Reported value for the method")
    baseline_value: Optional[Union[float, int]] = Field(None, description="Full-cache value in the same table")
    subset: Optional[str] = Field(None, min_length=1,
                                  description="Part of the benchmark: 'average', 'NIAH', 'RULER 32k', 'HotpotQA'")
    kv_fraction: Optional[float] = Field(None, gt=0, le=1, description=(
        "The compression in one unit: KV bytes held / a 16-bit full cache's bytes (0.25 = 4x), as the paper's "
        "setting implies; omitted when the paper gives too little to compute it"))
    paper_version: Optional[str] = Field(None, pattern=r"^v\d+$",
                                         description="arXiv version the number was read from, e.g. 'v2'")
    source: str = Field(min_length=1, pattern=r"(?i)^(table|figure|fig\.|section|abstract)",
                        description="Where in the paper: 'Table 2', 'Figure 4', 'Section 5.1'")


class Entry(BaseModel):
    """One method of the atlas."""

    model_config = _STRICT

    # identity
    id: str = Field(pattern=ID_RE, description="Stable slug, equal to the file name")
    name: str = Field(min_length=1)
    title: str = Field(min_length=1, description="The paper's title")
    authors: list[str] = Field(min_length=1)
    year: int = Field(ge=1990, le=2100)
    venue: Optional[str] = None
    arxiv: Optional[str] = Field(None, pattern=ARXIV_RE)
    doi: Optional[str] = Field(None, pattern=r"^10\.\d{4,9}/\S+$")
    url: str = Field(pattern=r"^https?://\S+$")
    code: Optional[str] = Field(None, pattern=r"^https?://\S+$")
    bibtex: str = Field(min_length=1)
    # the survey seed's axes (arXiv 2503.11816)
    principle: Principle
    also: list[Principle] = Field(default_factory=list, description="Secondary principles of hybrid methods")
    dimensions: list[Dimension] = Field(min_length=1)
    training: Training
    # how it works
    phase: Phase
    granularity: Granularity
    budget_policy: BudgetPolicy
    query_aware: bool
    summary: str = Field(min_length=40)
    key_equation: str = Field(min_length=3, description="LaTeX, without $ delimiters")
    benchmark_category: Optional[BenchmarkCategory] = Field(
        None, description="Family in the benchmark seed (arXiv 2407.01527), if the method fits one")
    kvpress: Optional[str] = Field(None, description="kvpress press class implementing it, if any")
    # evidence
    reported_results: list[Result] = Field(default_factory=list)
    no_results_reason: Optional[str] = Field(None, min_length=10, description=(
        "Why the entry has no reported result (e.g. a position paper, only latency numbers in figures)"))
    # links
    builds_on: list[str] = Field(default_factory=list)
    compared_with: list[str] = Field(default_factory=list)
    implementation: Optional[str] = Field(None, pattern=r"^reference_impls(\.[A-Za-z_][A-Za-z0-9_]*)+$")
    notebook: Optional[str] = Field(None, pattern=r"^notebooks/[A-Za-z0-9_]+\.py$")
    architecture: Optional[str] = Field(None, pattern=r"^reference_impls\.architectures(\.[A-Za-z_][A-Za-z0-9_]*)+$",
                                        description=(
        "For entries that change the model itself (trained in or converted, not a cache policy): the dotted "
        "path of its module in reference_impls.architectures (a torch nn.Module or conversion function)"))

    @field_validator("summary")
    @classmethod
    def _two_to_five_sentences(cls, v: str) -> str:
        n = len([s for s in re.split(r"(?<=[.!?])\s+", v.strip()) if s])
        if not 2 <= n <= 5:
            raise ValueError(f"summary must be 2-5 sentences in your own words, found {n}")
        return v

    @field_validator("bibtex")
    @classmethod
    def _bibtex_shape(cls, v: str) -> str:
        m = re.match(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", v.strip())
        if not m:
            raise ValueError("bibtex must start like '@article{key,'")
        if v.count("{") != v.count("}"):
            raise ValueError("bibtex has unbalanced braces")
        for need in ("title", "author", "year"):
            if not re.search(rf"\b{need}\s*=", v):
                raise ValueError(f"bibtex lacks the '{need}' field")
        return v

    @model_validator(mode="after")
    def _has_a_source(self) -> "Entry":
        if not (self.arxiv or self.doi or self.url):
            raise ValueError("an entry needs an arxiv id, a doi or a url")
        if (self.implementation is None) != (self.notebook is None) and self.implementation is not None:
            raise PydanticCustomError("needs_notebook", "an entry with an implementation also needs its notebook")
        if self.architecture is not None and self.notebook is None:
            raise PydanticCustomError("needs_notebook", "an entry with an architecture module also needs its notebook")
        if not self.reported_results and not self.no_results_reason:
            # its own error type, so the validator can name the field (a model validator has no location)
            raise PydanticCustomError("no_results", "an entry needs at least one reported result or a "
                                      "no_results_reason saying why it has none (both are empty)")
        return self

    @property
    def bibkey(self) -> str:
        return re.match(r"^@\w+\s*\{\s*([^,\s]+)", self.bibtex.strip()).group(1)


def json_schema() -> dict[str, Any]:
    """The entry schema as JSON Schema (draft 2020-12), for editors."""
    schema = Entry.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kvatlas taxonomy entry"
    return schema
