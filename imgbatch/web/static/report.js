// imgbatch report: the text and status filters (inlined; allowed by its CSP hash).
// The filter state also lives in the URL fragment (#q=cat&status=error), so a filtered
// view can be linked to.
(function () {
  "use strict";
  var q = document.getElementById("q");
  var st = document.getElementById("st");
  var shown = document.getElementById("shown");
  var items = Array.prototype.slice.call(document.querySelectorAll(".it"));
  var texts = null; // lower-cased text of every item, read once on the first filter
  var timer = null;

  function apply() {
    var words = q.value.toLowerCase().split(/\s+/).filter(Boolean);
    var want = st.value;
    if (words.length && texts === null) {
      texts = items.map(function (el) { return el.textContent.toLowerCase(); });
    }
    var n = 0;
    for (var i = 0; i < items.length; i++) {
      var el = items[i];
      var ok = !want || el.getAttribute("data-s") === want ||
        (want === "missing" && el.getAttribute("data-x") === "0");
      for (var w = 0; ok && w < words.length; w++) {
        ok = texts[i].indexOf(words[w]) !== -1;
      }
      if (el.hidden === ok) { el.hidden = !ok; }
      if (ok) { n++; }
    }
    shown.textContent = n.toLocaleString() + " of " + items.length.toLocaleString() + " shown";
    var frag = [];
    if (q.value) { frag.push("q=" + encodeURIComponent(q.value)); }
    if (want) { frag.push("status=" + encodeURIComponent(want)); }
    try {
      history.replaceState(null, "", frag.length ? "#" + frag.join("&") : location.pathname + location.search);
    } catch (e) { /* an opaque origin may refuse it: the filter works all the same */ }
  }

  function later() {
    clearTimeout(timer);
    timer = setTimeout(apply, 120);
  }

  var params = new URLSearchParams(location.hash.slice(1));
  if (params.get("q")) { q.value = params.get("q"); }
  if (params.get("status")) { st.value = params.get("status"); }
  q.addEventListener("input", later);
  st.addEventListener("change", apply);
  apply();
})();
