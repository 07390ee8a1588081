// kvatlas site behaviour, no external requests: KaTeX math, sortable tables and facet filters.
(function () {
  function renderMath() {
    if (!window.renderMathInElement) return;
    // pages from Markdown: pymdownx.arithmatex wraps math in .arithmatex with \[ \] and \( \)
    document.querySelectorAll(".arithmatex").forEach(function (el) {
      renderMathInElement(el, {delimiters: [{left: "\\[", right: "\\]", display: true},
                                            {left: "\\(", right: "\\)", display: false}],
                               throwOnError: false});
    });
    // executed notebooks: Markdown cells keep $$ ... $$ and $ ... $ (rendered here instead of MathJax from a CDN)
    document.querySelectorAll(".jp-MarkdownCell, .jp-RenderedMarkdown").forEach(function (el) {
      if (el.getAttribute("data-math")) return;
      el.setAttribute("data-math", "1");
      renderMathInElement(el, {delimiters: [{left: "$$", right: "$$", display: true},
                                            {left: "$", right: "$", display: false}],
                               throwOnError: false});
    });
  }

  function cellText(row, i) { return (row.cells[i] ? row.cells[i].textContent : "").trim(); }

  function makeSortable(table) {
    var head = table.tHead; if (!head) return;
    Array.prototype.forEach.call(head.rows[0].cells, function (th, i) {
      th.style.cursor = "pointer"; th.title = "sort";
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        Array.prototype.forEach.call(head.rows[0].cells, function (c) { c.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        rows.sort(function (a, b) {
          var x = cellText(a, i), y = cellText(b, i), nx = parseFloat(x), ny = parseFloat(y);
          if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
          return dir * x.localeCompare(y);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function makeFaceted(box) {
    if (box.getAttribute("data-ready")) return;
    var table = box.querySelector("table"); if (!table || !table.tHead) return;
    box.setAttribute("data-ready", "1");
    var cols = (box.getAttribute("data-facets") || "").split(",").filter(Boolean).map(Number);
    var bar = document.createElement("div"); bar.className = "kv-facets";
    var selects = [];
    var count = document.createElement("span"); count.className = "kv-count";
    function apply() {
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        var ok = selects.every(function (s) {
          if (!s.sel.value) return true;
          return cellText(r, s.col).split(/,\s*/).indexOf(s.sel.value) >= 0;
        });
        r.style.display = ok ? "" : "none"; if (ok) shown++;
      });
      count.textContent = shown + " of " + table.tBodies[0].rows.length + " shown";
    }
    cols.forEach(function (col) {
      var values = {};
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        cellText(r, col).split(/,\s*/).forEach(function (v) { if (v) values[v] = 1; });
      });
      var label = document.createElement("label");
      label.textContent = table.tHead.rows[0].cells[col].textContent + " ";
      var sel = document.createElement("select"); sel.setAttribute("data-col", col);
      sel.appendChild(new Option("all", ""));
      Object.keys(values).sort().forEach(function (v) { sel.appendChild(new Option(v, v)); });
      sel.addEventListener("change", apply);
      label.appendChild(sel); bar.appendChild(label); selects.push({col: col, sel: sel});
    });
    bar.appendChild(count);
    box.insertBefore(bar, box.firstChild);
    apply();
  }

  function init() {
    renderMath();
    document.querySelectorAll(".md-typeset table").forEach(function (t) {
      if (!t.getAttribute("data-sortable")) { t.setAttribute("data-sortable", "1"); makeSortable(t); }
    });
    document.querySelectorAll(".kv-faceted").forEach(makeFaceted);
  }
  if (window.document$ && window.document$.subscribe) window.document$.subscribe(init);
  document.addEventListener("DOMContentLoaded", init);
})();
