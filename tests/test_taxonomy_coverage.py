"""What the atlas promises to cover (issue #3): every family, both seeds' methods, every kvpress press."""

from collections import Counter

from reference_impls.atlas.schema import VOCAB
from reference_impls.atlas.validate import load_entries

ENTRIES, PROBLEMS = load_entries(check_links=False)
BY_ID = {e.id: e for e in ENTRIES}

# The methods the benchmark seed (arXiv 2407.01527) ran, by atlas id.
BENCHMARK_SEED = ["kivi", "flexgen", "streamingllm", "infllm", "h2o", "llmlingua-2", "mamba", "mamba-2",
                  "eagle-finch", "recurrentgemma", "griffin"]

# kvpress 0.5.4 presses that implement a published method (wrappers such as ComposedPress, DecodingPress or
# KeyRerotationPress implement no paper; RandomPress is the baseline).
KVPRESS_PRESSES = ["KnormPress", "SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress", "TOVAPress",
                   "ObservedAttentionPress", "QFilterPress", "PyramidKVPress", "LagKVPress", "KeyDiffPress",
                   "LeverageScorePress", "CompactorPress", "CURPress", "KVzapPress", "FastKVzipPress", "CapPress",
                   "ThinKPress", "SimLayerKVPress", "DuoAttentionPress", "FinchPress", "KVzipPress",
                   "RestoreKVPress", "KVComposePress", "AdaKVPress", "LUKVPress", "CriticalKVPress",
                   "CriticalAdaKVPress", "ChunkKVPress", "ChunkPress", "BlockPress", "DMSPress", "CAMPress"]


def test_at_least_120_valid_entries_with_sources_and_bibtex():
    assert not PROBLEMS
    assert len(ENTRIES) >= 120
    assert all((e.arxiv or e.doi or e.url) and e.bibtex for e in ENTRIES)
    assert sum(1 for e in ENTRIES if e.reported_results) >= 80


def test_every_principle_has_at_least_five_entries():
    counts = Counter(e.principle for e in ENTRIES)
    for p in VOCAB["principle"]:
        if p != "baseline":
            assert counts[p] >= 5, (p, counts[p])


def test_the_benchmark_seeds_methods_are_all_there_with_their_family():
    for mid in BENCHMARK_SEED:
        assert mid in BY_ID, mid
    assert all(BY_ID[m].benchmark_category for m in BENCHMARK_SEED)
    assert {e.benchmark_category for e in ENTRIES} >= set(VOCAB["benchmark_category"])


def test_every_kvpress_press_has_an_entry():
    named = {p.strip() for e in ENTRIES if e.kvpress for p in e.kvpress.split(",")}
    missing = [p for p in KVPRESS_PRESSES if p not in named]
    assert not missing, missing
