"""The graph diff: every inserted node highlighted and every skipped region marked, checked
against the rewritten graph itself; text and DOT forms; a 900-node graph stays usable; and
the page rendered by a real headless browser."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser

import pytest
import torch.fx as fx

import ditopt
from ditopt.graphdiff import graph_diff, is_branch
from ditopt.passes.annotations import node_annotation
from ditopt.plan import Plan
from ditopt.small_models import build


class Page(HTMLParser):
    """The node rows of a diff page, each with its classes and the groups around it."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.groups: list[dict] = []
        self._open: list[dict] = []
        self._stack: list[str] = []  # tag names, to match each </details> to its group
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details" and "data-group" in a:
            group = {"key": a["data-group"], "classes": a["class"].split(), "open": "open" in a}
            self.groups.append(group)
            self._open.append(group)
            self._stack.append("group")
        elif tag == "details":
            self._stack.append("details")
        elif tag == "div" and "data-id" in a:
            assert a["data-id"] not in self.rows, f"node {a['data-id']} drawn twice"
            self.rows[a["data-id"]] = {"classes": a["class"].split(), "status": a["data-status"],
                                       "groups": [g["key"] for g in self._open]}

    def handle_endtag(self, tag):
        if tag == "details" and self._stack.pop() == "group":
            self._open.pop()


def role(node: fx.Node):
    return node_annotation(node).role


def branch_nodes(gm: fx.GraphModule, prefix: str = ""):
    """(id prefix, branch node, graph module) for every skip branch, nested ones included."""
    for node in gm.graph.nodes:
        if is_branch(node):
            yield prefix, node, gm
            compute = node.args[1].target
            yield from branch_nodes(gm.get_submodule(compute), f"{prefix}{compute}.")


@pytest.fixture(scope="module")
def wan_fora():
    model, inputs = build("wan")
    diff = graph_diff(model, ditopt.presets.fora(interval=2, steps=6), **inputs)
    return diff, Page(diff.to_html())


def test_every_inserted_node_is_highlighted(wan_fora):
    diff, page = wan_fora
    before = {n.name for n in diff.before.graph.nodes}
    top_new = [n for n in diff.after.graph.nodes if n.name not in before]
    # What is new in the rewritten graph is exactly what the passes annotated with a role.
    assert {n.name for n in top_new} == {n.name for n in diff.after.graph.nodes if role(n)}
    expected = {n.name for n in top_new}
    for prefix, node, gm in branch_nodes(diff.after):
        compute, reuse = (gm.get_submodule(a.target) for a in node.args[1:3])
        expected |= {f"{prefix}{node.args[1].target}.{n.name}" for n in compute.graph.nodes
                     if role(n) and n.op != "placeholder"}  # a branch's placeholders stand for its operands
        expected |= {f"{prefix}{node.args[2].target}.{n.name}" for n in reuse.graph.nodes
                     if n.op not in ("placeholder", "output")}
    assert len(expected) > 40
    for node_id in expected:
        assert node_id in page.rows, node_id
        assert page.rows[node_id]["status"] == "inserted" and "inserted" in page.rows[node_id]["classes"]
    highlighted = {i for i, r in page.rows.items() if r["status"] == "inserted"}
    assert highlighted == expected


def test_every_skipped_region_is_marked(wan_fora):
    diff, page = wan_fora
    regions = list(branch_nodes(diff.after))
    assert len(regions) == 6  # attn1, attn2, ffn in each of 2 blocks
    group_keys = {g["key"] for g in page.groups}
    for prefix, node, _ in regions:
        site = node_annotation(node).site
        assert f"branch:{site}" in group_keys and f"compute:{site}" in group_keys and f"reuse:{site}" in group_keys
        inside = f"{prefix}{node.args[1].target}."
        for name in node_annotation(node).replaced:
            row = page.rows[inside + name]
            assert row["status"] in ("skipped", "inserted"), name
            assert f"compute:{site}" in row["groups"] and f"branch:{site}" in row["groups"], (name, row)
            if row["status"] == "skipped":
                assert "skipped" in row["classes"]
    assert sum(len(v) for v in diff.skipped_regions().values()) == diff.counts()["skipped"]


def test_original_nodes_are_all_drawn_once(wan_fora):
    diff, page = wan_fora
    drawn = sorted(r_id.rsplit(".", 1)[-1] for r_id, r in page.rows.items() if r["status"] != "inserted")
    assert drawn == sorted(n.name for n in diff.before.graph.nodes)


def test_sites_are_groups_in_graph_order_and_collapsed(wan_fora):
    diff, page = wan_fora
    site_groups = [g for g in page.groups if "site" in g["classes"]]
    assert [g["key"] for g in site_groups] == [f"site:{s}" for s in diff.sites.names()]
    assert not any(g["open"] for g in site_groups)
    assert all(g["open"] for g in page.groups if g["classes"][1] in ("branch", "compute", "reuse"))


def test_page_is_self_contained(wan_fora):
    html = wan_fora[0].to_html()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert not re.search(r"""\b(src|href)=["'](?!#)""", html)
    assert html.count("<svg") > 10 and "<script>" in html


def test_node_details_are_in_the_page(wan_fora):
    html = wan_fora[0].to_html()
    assert '"name":"decide_default","op":"call_function","target":"ditopt.decide.default","shape":"bool[]"' in html
    assert '"module":"blocks.0.attn1.to_q"' in html
    # hover text: op, target, shape, module path
    assert 'title="call_function · torch._C._nn.linear · float32[1, 48, 32] · blocks.0.attn1.to_q"' in html


def test_text_is_a_unified_diff_with_site_headers(wan_fora):
    text = wan_fora[0].to_text()
    assert "--- before passes" in text and "+++ after passes" in text
    assert "    # ---- site blocks.0.attn1 (attention, self) ----" in text
    assert "+    decide_default = torch.ops.ditopt.decide.default(" in text
    assert "+    # ---- skip branch of blocks.0.attn1: compute side (not run at steps where it reuses) ----" in text
    assert "+    clone = cache_load_default.clone()" in text
    # moved lines read as unchanged context, not as removed and added again
    assert not any(line.startswith("-    query = ") for line in text.splitlines())
    assert "  blocks.0.attn1 CRCRCR" in text


def test_dot_has_a_cluster_per_group_and_no_parameters(wan_fora):
    diff, _ = wan_fora
    dot = diff.to_dot()
    assert dot.startswith("digraph ditopt_diff {") and dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == len(diff.root.groups())
    drawn = len(re.findall(r"^\s+n\d+ \[label=", dot, re.M))
    assert drawn == sum(1 for n in diff.nodes if not n.param)
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", os.devnull], input=dot, text=True, check=True)


def test_nested_skip_branches_nest_in_the_page():
    model, inputs = build("dit")
    plan = Plan.from_yaml("""
version: 1
steps: 4
rules:
  - {sites: "*", kind: block, steps: [1, 3], action: reuse_residual}
  - {sites: "*", kind: attention, steps: [2], action: reuse}
""")
    diff = graph_diff(model, plan, **inputs)
    page = Page(diff.to_html())
    block, attn = "transformer_blocks.0", "transformer_blocks.0.attn1"
    inner = [n for n in diff.nodes if n.skipped_by == (block, attn) and not n.inserted]
    assert inner
    for n in inner:
        groups = page.rows[n.id]["groups"]
        assert groups.index(f"compute:{block}") < groups.index(f"site:{attn}") < groups.index(f"compute:{attn}")
    assert diff.decisions()[attn] == ["compute", "skipped", "reuse", "skipped"]
    assert "  transformer_blocks.0.attn1 CSRS" in diff.to_text()


def test_adaptive_rules_show_as_adaptive():
    model, inputs = build("dit")
    diff = graph_diff(model, ditopt.presets.first_block_cache(0.1, steps=4), **inputs)
    assert diff.decisions()["transformer_blocks.1"] == ["adaptive"] * 4
    assert {n.role for n in diff.inserted()} >= {"indicator", "skip_branch"}
    assert 'class="d-adaptive"' in diff.to_html()


def test_all_compute_plan_inserts_only_step_tracking():
    model, inputs = build("dit")
    diff = graph_diff(model, ditopt.presets.all_compute(steps=4), **inputs)
    assert sorted(n.role for n in diff.inserted()) == ["begin_step", "token"]
    assert diff.skipped_regions() == {}
    assert "Every site computes at every step." in diff.to_html()


def test_a_900_node_graph_renders_fast_with_sites_collapsed():
    model, inputs = build("hunyuan")
    diff = graph_diff(model, ditopt.presets.fora(interval=2, steps=20), **inputs)
    start = time.perf_counter()
    html = diff.to_html()
    seconds = time.perf_counter() - start
    page = Page(html)
    assert len(diff.before.graph.nodes) > 800 and len(page.rows) == len(diff.nodes) > 900
    assert seconds < 5, seconds
    assert len(html) < 2_000_000
    site_groups = [g for g in page.groups if "site" in g["classes"] or g["key"] in ("inputs", "outside")]
    assert site_groups and not any(g["open"] for g in site_groups)
    # the top level is a handful of collapsed groups, not hundreds of rows
    assert sum(1 for r in page.rows.values() if not r["groups"]) <= 2


# -- a real browser ----------------------------------------------------------------------------

def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return path


def _headless(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_page_renders_in_a_headless_browser(tmp_path):
    from PIL import Image

    from ditopt.cli import main

    chromium = _chromium()
    page_path = tmp_path / "wan.html"
    assert main(["diff", "wan", "--preset", "fora-2", "-o", str(page_path)]) == 0
    html = page_path.read_text()
    expected_sites = sorted(set(re.findall(r'<details class="grp site"[^>]*data-site="([^"]+)"', html)))
    assert len(expected_sites) == 10  # output, stack, 2 blocks x (block, attn1, attn2, ffn)

    url = page_path.as_uri() + "#node=decide_default"
    dom = _headless(chromium, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert f'data-rendered="{len(expected_sites)}"' in body, body
    assert 'data-selected="decide_default"' in body
    assert "data-errors" not in re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert "Uncaught" not in dom.stderr
    # the script filled the details panel for the linked node
    panel = re.search(r'<aside id="panel">(.*?)</aside>', dom.stdout, re.S).group(1)
    assert "ditopt.decide.default" in panel and "blocks.0.attn1" in panel
    assert set(re.findall(r'data-site="([^"]+)"', dom.stdout)) == set(expected_sites)

    png = tmp_path / "wan.png"
    shot = _headless(chromium, f"--screenshot={png}", "--window-size=1400,1000", page_path.as_uri())
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1400, 1000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, the plan table, the overview map: not a blank page
    # the overview map's skipped (blue) and inserted (orange) ticks are on screen
    pixels = set(image.getdata())
    assert (0x3B, 0x78, 0xD8) in pixels and (0xF0, 0x8C, 0x00) in pixels
