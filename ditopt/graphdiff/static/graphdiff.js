// The graph-diff page's script (ditopt/graphdiff/html.py inlines it): node details on click, search, filters,
// expand and collapse, #node=<id> links. It marks <body> with data-rendered and data-nodes when it has run.
(function () {
  var data = JSON.parse(document.getElementById('ditopt-nodes').textContent);
  var panel = document.getElementById('panel'), graph = document.getElementById('graph');
  var users = data.map(function () { return []; });
  data.forEach(function (d, i) { d.inputs.forEach(function (j) { users[j].push(i); }); });
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function links(list) {
    if (!list.length) return '<i>none</i>';
    return list.map(function (j) { return '<a data-n="' + j + '">' + esc(data[j].name) + '</a>'; }).join(' ');
  }
  function reveal(el) {
    for (var p = el.parentElement; p; p = p.parentElement) if (p.tagName === 'DETAILS') p.open = true;
  }
  var selected = null;
  function show(i) {
    var d = data[i], el = document.getElementById('N' + i);
    if (selected) selected.classList.remove('sel');
    selected = el; if (el) el.classList.add('sel');
    document.body.dataset.selected = d.id;
    var status = d.status + (d.skipped_by.length ? ' (runs only when ' + d.skipped_by.join(', ') + ' computes)' : '');
    panel.innerHTML = '<h2>' + esc(d.name) + '</h2><dl>' +
      '<dt>status</dt><dd>' + esc(status) + '</dd>' +
      (d.role ? '<dt>inserted as</dt><dd>' + esc(d.role) + '</dd>' : '') +
      '<dt>op</dt><dd>' + esc(d.op) + '</dd><dt>target</dt><dd>' + esc(d.target) + '</dd>' +
      '<dt>shape</dt><dd>' + esc(d.shape || '-') + '</dd><dt>module path</dt><dd>' + esc(d.module || '-') + '</dd>' +
      '<dt>site</dt><dd>' + esc(d.site || '-') + '</dd><dt>id</dt><dd>' + esc(d.id) + '</dd>' +
      '<dt>inputs</dt><dd>' + links(d.inputs) + '</dd><dt>users</dt><dd>' + links(users[i]) + '</dd></dl>';
  }
  function jump(i) {
    var el = document.getElementById('N' + i);
    if (el) { reveal(el); el.scrollIntoView({block: 'center'}); }
    show(i);
  }
  graph.addEventListener('click', function (e) {
    var row = e.target.closest('.n');
    if (row) show(+row.id.slice(1));
  });
  panel.addEventListener('click', function (e) {
    var a = e.target.closest('[data-n]');
    if (a) { e.preventDefault(); jump(+a.dataset.n); }
  });
  document.getElementById('overview').addEventListener('click', function (e) {
    var band = e.target.closest('[data-group]');
    if (!band) return;
    var g = document.getElementById(band.dataset.group);
    reveal(g); g.open = true; g.scrollIntoView({block: 'start'});
  });
  document.getElementById('expand').onclick = function () {
    graph.querySelectorAll('details').forEach(function (d) { d.open = true; });
  };
  document.getElementById('collapse').onclick = function () {
    graph.querySelectorAll('details.site, details.inputs, details.outside').forEach(function (d) { d.open = false; });
  };
  document.querySelectorAll('.tools input[type=checkbox]').forEach(function (box) {
    box.onchange = function () { document.body.classList.toggle('hide-' + box.value, !box.checked); };
  });
  var search = document.getElementById('search');
  search.oninput = function () {
    var q = search.value.trim().toLowerCase(), hits = 0;
    graph.querySelectorAll('.n').forEach(function (row) {
      var d = data[+row.id.slice(1)];
      var hit = !q || (d.name + ' ' + d.target + ' ' + d.module).toLowerCase().indexOf(q) >= 0;
      row.classList.toggle('nomatch', !hit);
      if (hit && q && hits++ < 200) reveal(row);
    });
  };
  if (location.hash.indexOf('#node=') === 0) {  // a link to one node: #node=<id>
    var wanted = decodeURIComponent(location.hash.slice(6));
    var k = data.findIndex(function (d) { return d.id === wanted; });
    if (k >= 0) jump(k);
  }
  var sites = {};
  graph.querySelectorAll('details.site').forEach(function (d) { sites[d.dataset.site] = true; });
  document.body.dataset.nodes = String(graph.querySelectorAll('.n').length);
  document.body.dataset.rendered = String(Object.keys(sites).length);
})();
