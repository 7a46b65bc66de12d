// imgbatch serve: the dashboard. No build step, no CDN.
//
// The token (every server has one: given, or made at its start and printed on its
// stderr) comes in the URL fragment, #token=..., which no browser sends to a server or
// in a Referer; it is kept in sessionStorage (this tab only) and taken out of the
// address bar. Every /api/ request carries it, the report's too (shown from a blob). The event stream is read with fetch(), not
// EventSource, which cannot send the Authorization header; so reconnecting (with
// Last-Event-ID, for the events missed meanwhile) is done here too.
(function () {
  "use strict";

  var KEY = "imgbatch-token";
  var LIVE = { QUEUED: true, PROCESSING: true };
  var MAX_FAILURES = 500; // failures shown at most (all of them: /api/runs/ID/items)

  var frag = new URLSearchParams(location.hash.slice(1));
  if (frag.get("token")) {
    sessionStorage.setItem(KEY, frag.get("token"));
    frag.delete("token");
    var rest = frag.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }

  function $(id) { return document.getElementById(id); }

  function authHeaders(extra) {
    var h = extra || {};
    var token = sessionStorage.getItem(KEY);
    if (token) { h.Authorization = "Bearer " + token; }
    return h;
  }

  function api(path, method, body) {
    var init = { method: method || "GET", cache: "no-store", headers: authHeaders() };
    if (method === "POST") {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body || {});
    }
    return fetch(path, init).then(function (resp) {
      return resp.json().catch(function () { return null; }).then(function (data) {
        if (!resp.ok) {
          var err = new Error((data && data.error) || "HTTP " + resp.status);
          err.status = resp.status;
          throw err;
        }
        return data;
      });
    });
  }

  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  function num(n) { return n == null ? "?" : Number(n).toLocaleString(); }

  function duration(s) {
    if (s == null) { return "?"; }
    s = Math.round(s);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  }

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text != null) { e.textContent = text; }
    if (cls) { e.className = cls; }
    return e;
  }

  // -- the runs table -----------------------------------------------------------

  var selected = null; // the run followed
  var runsTimer = null;

  function loadRuns() {
    clearTimeout(runsTimer);
    return api("/api/runs").then(function (data) {
      $("api-error").textContent = "";
      var body = $("runs").tBodies[0];
      body.textContent = "";
      var anyLive = false;
      data.runs.forEach(function (run) {
        anyLive = anyLive || !!LIVE[run.state];
        var tr = document.createElement("tr");
        tr.dataset.id = run.id;
        if (run.id === selected) { tr.className = "sel"; }
        var p = run.progress || {};
        tr.appendChild(el("td", String(run.id), "num"));
        tr.appendChild(el("td", run.root, "root"));
        tr.appendChild(el("td", (run.provider || "auto") + (run.model ? " (" + run.model + ")" : "")));
        var st = el("td");
        st.appendChild(el("span", run.state, "state " + run.state));
        tr.appendChild(st);
        tr.appendChild(el("td", num(p.done) + (p.total != null ? " / " + num(p.total) : ""), "num"));
        tr.appendChild(el("td", num(p.failed), "num"));
        tr.appendChild(el("td", new Date(run.created * 1000).toLocaleString()));
        tr.addEventListener("click", function () { follow(run.id); });
        body.appendChild(tr);
      });
      $("no-runs").hidden = data.runs.length > 0;
      if (selected === null && data.runs.length) { follow(data.runs[0].id); }
      runsTimer = setTimeout(loadRuns, anyLive ? 2000 : 10000);
    }).catch(function (err) {
      $("api-error").textContent = err.status === 401
        ? "This server wants its token: open this page with the address `imgbatch serve` printed (…/#token=…), or as /#token=YOUR_TOKEN."
        : "Cannot list the runs: " + err.message;
      runsTimer = setTimeout(loadRuns, 10000);
    });
  }

  // -- one run, followed live ---------------------------------------------------

  var stream = null; // the AbortController of the stream being read

  function follow(id) {
    if (stream) { stream.abort(); }
    selected = id;
    Array.prototype.forEach.call($("runs").tBodies[0].rows, function (tr) {
      tr.className = Number(tr.dataset.id) === id ? "sel" : "";
    });
    $("detail").hidden = false;
    $("d-id").textContent = id;
    $("d-failures").textContent = "";
    $("d-report-links").textContent = "";
    $("d-error").textContent = "";
    $("d-report").disabled = false;
    api("/api/runs/" + id).then(function (run) {
      if (selected !== id) { return; }
      $("d-root").textContent = run.root;
      var sroot = $("search").root;
      if (!sroot.value) { sroot.value = run.root; } // search what is being looked at
      showState(run.state);
      showProgress(run.progress);
      if (run.error) { $("d-error").textContent = run.error; }
    }).catch(function () { /* the stream says what there is to say */ });
    stream = new AbortController();
    readEvents(id, stream.signal);
  }

  function showState(state) {
    var s = $("d-state");
    s.textContent = state;
    s.className = "state " + state;
    $("d-progress").className = "bar " + state;
    $("d-cancel").disabled = !LIVE[state];
  }

  function showProgress(p) {
    if (!p) { return; }
    var pct = p.percent == null ? 0 : p.percent;
    $("d-bar").style.width = pct + "%";
    $("d-progress").setAttribute("aria-valuenow", String(pct));
    var parts = [num(p.done) + (p.total != null ? " of " + num(p.total) : "") + " images"];
    if (p.percent != null) { parts.push(p.percent + "%"); }
    parts.push(num(p.failed) + " failed");
    parts.push(num(p.images_per_min) + " images/min");
    parts.push(duration(p.elapsed) + " elapsed");
    if (p.eta_seconds != null) { parts.push("ETA " + duration(p.eta_seconds)); }
    $("d-numbers").textContent = parts.join(" · ");
    $("d-nfail").textContent = p.failed ? "(" + num(p.failed) + ")" : "";
  }

  function showFailure(rec) {
    var list = $("d-failures");
    var li = el("li");
    var err = rec.error || {};
    li.appendChild(el("b", err.code || "?"));
    li.appendChild(el("span", rec.path));
    if (err.message) { li.appendChild(el("span", " · " + err.message, "muted")); }
    list.insertBefore(li, list.firstChild);
    while (list.children.length > MAX_FAILURES) { list.removeChild(list.lastChild); }
  }

  function onEvent(id, name, data) {
    if (selected !== id) { return false; }
    var value = JSON.parse(data);
    if (name === "progress") {
      showState(value.state);
      showProgress(value);
    } else if (name === "item") {
      showFailure(value);
    } else if (name === "done") {
      showState(value.state);
      showProgress(value.progress);
      if (value.error) { $("d-error").textContent = value.error; }
      loadRuns();
      return true;
    }
    return false;
  }

  function setConn(text) {
    var c = $("conn");
    c.textContent = text;
    c.className = "conn " + text;
  }

  // Server-Sent Events over fetch(): lines, fields, a blank line ends an event.
  async function readEvents(id, signal) {
    var lastId = null;
    var delay = 1000;
    while (!signal.aborted) {
      try {
        var headers = authHeaders({ Accept: "text/event-stream" });
        if (lastId !== null) { headers["Last-Event-ID"] = lastId; }
        var resp = await fetch("/api/runs/" + id + "/events", { headers: headers, signal: signal, cache: "no-store" });
        if (resp.status === 204) { setConn("idle"); return; } // ended, and every event seen
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        setConn("live");
        delay = 1000;
        var reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        var buf = "";
        var ev = { name: "", data: [], id: null };
        for (;;) {
          var chunk = await reader.read();
          if (chunk.done) { break; }
          buf += chunk.value;
          for (;;) {
            var m = /\r\n|\r|\n/.exec(buf);
            if (!m || (m[0] === "\r" && m.index === buf.length - 1)) { break; } // \r\n may be split
            var line = buf.slice(0, m.index);
            buf = buf.slice(m.index + m[0].length);
            if (line === "") {
              if (ev.id !== null) { lastId = ev.id; }
              if (ev.data.length && onEvent(id, ev.name || "message", ev.data.join("\n"))) {
                setConn("idle");
                return;
              }
              ev = { name: "", data: [], id: null };
              continue;
            }
            if (line[0] === ":") { continue; } // a comment: the heartbeat
            var colon = line.indexOf(":");
            var field = colon < 0 ? line : line.slice(0, colon);
            var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") { ev.data.push(value); }
            else if (field === "event") { ev.name = value; }
            else if (field === "id" && value.indexOf("\0") < 0) { ev.id = value; }
            else if (field === "retry" && /^\d+$/.test(value)) { delay = Number(value); }
          }
        }
      } catch (err) {
        if (signal.aborted) { return; }
      }
      setConn("reconnecting");
      await sleep(delay);
      delay = Math.min(delay * 2, 15000);
    }
  }

  // -- actions ------------------------------------------------------------------

  $("d-cancel").addEventListener("click", function () {
    var id = selected;
    $("d-cancel").disabled = true;
    api("/api/runs/" + id + "/cancel", "POST", {}).catch(function (err) {
      $("d-error").textContent = err.message;
    });
  });

  $("d-report").addEventListener("click", function () {
    var id = selected;
    var button = $("d-report");
    var links = $("d-report-links");
    button.disabled = true;
    links.textContent = "making the report…";
    fetch("/api/runs/" + id + "/report", { headers: authHeaders(), cache: "no-store" })
      .then(function (resp) {
        if (!resp.ok) {
          return resp.json().then(function (d) { throw new Error(d.error); });
        }
        return resp.blob();
      })
      .then(function (blob) {
        if (selected !== id) { return; }
        var url = URL.createObjectURL(new Blob([blob], { type: "text/html" }));
        links.textContent = "";
        var open = el("a", "open the report");
        open.href = url;
        open.target = "_blank";
        open.rel = "noopener";
        var save = el("a", "save it");
        save.href = url;
        save.download = "imgbatch-report-run-" + id + ".html";
        links.appendChild(open);
        links.appendChild(document.createTextNode(" · "));
        links.appendChild(save);
        button.disabled = false;
      })
      .catch(function (err) {
        links.textContent = "";
        $("d-error").textContent = "No report: " + err.message;
        button.disabled = false;
      });
  });

  $("start").addEventListener("submit", function (e) {
    e.preventDefault();
    var f = e.target;
    var body = { root: f.root.value.trim() };
    if (f.provider.value.trim()) { body.provider = f.provider.value.trim(); }
    if (f.model.value.trim()) { body.model = f.model.value.trim(); }
    if (f.limit.value) { body.limit = Number(f.limit.value); }
    if (f.fresh.checked) { body.fresh = true; }
    if (f.retry_failed.checked) { body.retry_failed = true; }
    $("start-error").textContent = "";
    api("/api/runs", "POST", body).then(function (run) {
      selected = null;
      follow(run.id);
      loadRuns();
    }).catch(function (err) {
      $("start-error").textContent = err.message;
    });
  });

  // -- search (GET /api/search: `imgbatch search`'s records, best first) ------------

  var searchSeq = 0; // answers to an older search are dropped

  function showHit(hit) {
    var li = el("li");
    var head = el("div");
    head.appendChild(el("span", hit.path, "path" + (hit.exists === false ? " gone" : "")));
    head.appendChild(el("span", "score " + Number(hit.score).toFixed(2), "score muted"));
    li.appendChild(head);
    var result = hit.result && typeof hit.result === "object" ? hit.result : {};
    var text = typeof result.description === "string" ? result.description : "";
    if (hit.error) { text = hit.error.code + " · " + (hit.error.message || ""); }
    if (text) { li.appendChild(el("p", text, "desc" + (hit.error ? " err" : ""))); }
    if (Array.isArray(result.tags) && result.tags.length) {
      var tags = el("div", null, "tags");
      result.tags.forEach(function (t) {
        if (typeof t === "string") { tags.appendChild(el("span", t, "tag")); }
      });
      li.appendChild(tags);
    }
    return li;
  }

  $("search").addEventListener("submit", function (e) {
    e.preventDefault();
    var f = e.target;
    var params = new URLSearchParams({ root: f.root.value.trim(), q: f.q.value.trim() });
    if (f.tag.value.trim()) { params.append("tag", f.tag.value.trim()); }
    if (f.limit.value) { params.set("limit", f.limit.value); }
    var seq = ++searchSeq;
    $("s-error").textContent = "";
    $("s-count").textContent = "searching…";
    api("/api/search?" + params.toString()).then(function (data) {
      if (seq !== searchSeq) { return; }
      var list = $("s-hits");
      list.textContent = "";
      data.hits.forEach(function (hit) { list.appendChild(showHit(hit)); });
      var n = data.hits.length;
      $("s-count").textContent = n ? "(" + num(n) + (n === 1 ? " hit)" : " hits)") : "(no hits)";
    }).catch(function (err) {
      if (seq !== searchSeq) { return; }
      $("s-hits").textContent = "";
      $("s-count").textContent = "";
      $("s-error").textContent = err.message;
    });
  });

  loadRuns();
})();
