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


  // compare page: two to four methods side by side; the choice lives in the address (?m=a,b)
  function makeCompare() {
    var box = document.getElementById("kv-compare"), src = document.getElementById("kv-compare-data");
    if (!box || !src || box.getAttribute("data-ready")) return;
    box.setAttribute("data-ready", "1");
    var data = JSON.parse(src.textContent), ids = Object.keys(data);
    var wanted = (new URLSearchParams(location.search).get("m") || "").split(",").filter(function (m) { return data[m]; });
    ["snapkv", "h2o", "kivi", "streamingllm"].forEach(function (d) {
      if (wanted.length < 2 && data[d] && wanted.indexOf(d) < 0) wanted.push(d);
    });
    var pick = document.createElement("div"); pick.className = "kv-compare-pick";
    var selects = [];
    for (var i = 0; i < 4; i++) {
      var label = document.createElement("label"); label.textContent = "Method " + (i + 1) + " ";
      var sel = document.createElement("select"); sel.setAttribute("data-slot", i);
      if (i >= 2) sel.appendChild(new Option("(none)", ""));
      ids.forEach(function (id) { sel.appendChild(new Option(data[id].name, id)); });
      sel.value = wanted[i] || (i >= 2 ? "" : ids[i]);
      sel.addEventListener("change", render);
      label.appendChild(sel); pick.appendChild(label); selects.push(sel);
    }
    var out = document.createElement("div");
    box.appendChild(pick); box.appendChild(out);
    var rows = [["Paper", function (e, id) { return '<a href="../taxonomy/' + id + '/">' + esc(e.title) + "</a>"; }],
                ["Year, venue", function (e) { return e.year + (e.venue ? ", " + esc(e.venue) : ""); }],
                ["Principle", "principle"], ["Compresses", function (e) { return e.dimensions.join(", "); }],
                ["Training", "training"], ["Phase", "phase"], ["Granularity", "granularity"],
                ["Budget policy", "budget_policy"], ["Query-aware", function (e) { return e.query_aware ? "yes" : "no"; }],
                ["Reference implementation", function (e) { return e.implemented ? "yes" : "no"; }],
                ["Results reported by the paper", "reported"],
                ["Key equation", function (e) { return '<span class="kv-eq" data-tex="' + esc(e.equation) + '"></span>'; }]];
    function esc(t) { return String(t).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
    function render() {
      var chosen = selects.map(function (s) { return s.value; }).filter(Boolean);
      var keys = {};
      chosen.forEach(function (id) { Object.keys(data[id].measured).forEach(function (k) { keys[k] = 1; }); });
      var measuredRows = Object.keys(keys).sort().map(function (k) {
        return ["Measured (legacy passkey, fp32 unit): " + k + " (accuracy @ achieved ×)", function (e) {
          var m = e.measured[k]; return m ? m[0].toFixed(2) + " @ " + m[1].toFixed(2) + "×" : "—"; }];
      });
      var html = '<table class="kv-compare-table"><thead><tr><th></th>' + chosen.map(function (id) {
        return "<th>" + esc(data[id].name) + "</th>"; }).join("") + "</tr></thead><tbody>";
      rows.concat(measuredRows).forEach(function (r) {
        html += "<tr><th>" + r[0] + "</th>" + chosen.map(function (id) {
          var e = data[id]; return "<td>" + (typeof r[1] === "string" ? esc(e[r[1]]) : r[1](e, id)) + "</td>"; }).join("") + "</tr>";
      });
      out.innerHTML = html + "</tbody></table>";
      if (window.katex) out.querySelectorAll(".kv-eq").forEach(function (el) {
        window.katex.render(el.getAttribute("data-tex"), el, {throwOnError: false, displayMode: false});
      });
      if (history.replaceState) history.replaceState(null, "", "?m=" + chosen.join(","));
    }
    render();
  }

  function init() {
    renderMath();
    document.querySelectorAll(".md-typeset table").forEach(function (t) {
      if (!t.getAttribute("data-sortable")) { t.setAttribute("data-sortable", "1"); makeSortable(t); }
    });
    document.querySelectorAll(".kv-faceted").forEach(makeFaceted);
    makeCompare();
  }
  if (window.document$ && window.document$.subscribe) window.document$.subscribe(init);
  document.addEventListener("DOMContentLoaded", init);
})();
