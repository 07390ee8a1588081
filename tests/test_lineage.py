"""The family lineage SVG on a tiny fixture graph: valid XML, the expected nodes, edges, links and layout."""

import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from reference_impls.atlas.lineage import family_graph, family_svg
from reference_impls.atlas.schema import Entry

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "taxonomy" / "streamingllm.yaml").read_text())
NS = {"s": "http://www.w3.org/2000/svg"}


def entry(eid, year, principle="token-eviction", builds_on=(), compared_with=(), name=None):
    return Entry.model_validate({**BASE, "id": eid, "name": name or eid.upper(), "year": year, "principle": principle,
                                 "builds_on": list(builds_on), "compared_with": list(compared_with),
                                 "implementation": None, "notebook": None})


# aa (2023) -> bb (2024) -> dd (2024); cc is another family's method that d builds on; ee is unrelated
ENTRIES = [
    entry("aa", 2023, name="Alpha & <Sons>"),
    entry("bb", 2024, builds_on=["aa"], compared_with=["cc", "aa"]),
    entry("cc", 2022, principle="quantization"),
    entry("dd", 2024, builds_on=["bb", "cc"], compared_with=["aa", "ee"]),
    entry("ee", 2025, principle="quantization"),
]


def parse(svg):
    root = ET.fromstring(svg)
    nodes = {a.get("data-id"): a for a in root.iter("{http://www.w3.org/2000/svg}a")}
    for a in nodes.values():  # the links are xlink:href (see lineage.py); read them as href
        a.set("href", a.get("{http://www.w3.org/1999/xlink}href"))
    edges = {(p.get("class"), p.get("data-from"), p.get("data-to")) for p in root.iter("{http://www.w3.org/2000/svg}path")
             if p.get("data-from")}
    return root, nodes, edges


def test_the_fixture_family_has_its_nodes_edges_and_links():
    root, nodes, edges = parse(family_svg(ENTRIES, "token-eviction"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert set(nodes) == {"aa", "bb", "dd", "cc"}  # ee: another family, nobody builds on it
    assert "kv-lin-ancestor" in nodes["cc"].get("class") and "kv-lin-ancestor" not in nodes["bb"].get("class")
    assert {n.get("href") for n in nodes.values()} == {"../aa/", "../bb/", "../cc/", "../dd/"}
    assert edges == {("kv-lin-builds-on", "aa", "bb"), ("kv-lin-builds-on", "bb", "dd"), ("kv-lin-builds-on", "cc", "dd"),
                     ("kv-lin-compared-with", "cc", "bb"), ("kv-lin-compared-with", "aa", "dd")}
    # the label is escaped text, the full name is in the tooltip
    assert nodes["aa"].find("s:text", NS).text == "Alpha & <Sons>"
    assert nodes["aa"].find("s:title", NS).text.startswith("Alpha & <Sons> (2023")


def test_columns_go_by_year_and_same_year_followers_sit_to_the_right():
    _, nodes, _ = parse(family_svg(ENTRIES, "token-eviction"))
    x = {i: float(n.find("s:rect", NS).get("x")) for i, n in nodes.items()}
    assert x["cc"] < x["aa"] < x["bb"] < x["dd"]  # 2022 < 2023 < 2024, and dd builds on bb in the same year
    years = [t.text for t in ET.fromstring(family_svg(ENTRIES, "token-eviction")).iter("{http://www.w3.org/2000/svg}text")
             if t.get("class") == "kv-lin-year"]
    assert years == ["2022", "2023", "2024"]


def test_options_and_edge_cases():
    _, nodes, edges = parse(family_svg(ENTRIES, "token-eviction", href=lambda i: f"{i}.md", compared=False))
    assert nodes["aa"].get("href") == "aa.md" and all(kind == "kv-lin-builds-on" for kind, _, _ in edges)
    assert family_svg(ENTRIES, "low-rank") == ""
    members, ancestors, builds, _ = family_graph(ENTRIES, "quantization")
    assert {e.id for e in members} == {"cc", "ee"} and not ancestors and not builds
    # a crowded year wraps into more columns instead of growing without end
    many = [entry(f"m{i:02d}", 2024) for i in range(30)]
    _, nodes, _ = parse(family_svg(many, "token-eviction"))
    assert len(nodes) == 30 and len({n.find("s:rect", NS).get("x") for n in nodes.values()}) == 3
    # a builds_on cycle inside one year does not hang the layout
    loop = [entry("pp", 2024, builds_on=["qq"]), entry("qq", 2024, builds_on=["pp"])]
    assert set(parse(family_svg(loop, "token-eviction"))[1]) == {"pp", "qq"}


def test_an_edge_back_in_time_leaves_from_the_left_side():
    """An entry dated before the work it builds on (a library cited by its first release): still readable."""
    _, nodes, _ = parse(family_svg([entry("old", 2019, builds_on=["new"]), entry("new", 2024)], "token-eviction"))
    path = next(p for p in ET.fromstring(family_svg([entry("old", 2019, builds_on=["new"]), entry("new", 2024)],
                                                    "token-eviction")).iter("{http://www.w3.org/2000/svg}path")
                if p.get("data-from") == "new")
    start_x = float(path.get("d")[1:].split(",")[0])
    assert start_x == float(nodes["new"].find("s:rect", NS).get("x"))
