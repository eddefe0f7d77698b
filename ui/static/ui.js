// Polos UI: the only script. Live regions follow a server-sent event stream and swap in the
// HTML the server rendered (and escaped); payloads too big for the page load on demand and are
// shown as text. No framework, no network but this server.
(function () {
  "use strict";

  function openDetails(root) {
    var open = [];
    root.querySelectorAll("details[id][open]").forEach(function (d) { open.push(d.id); });
    return open;
  }

  function follow(el) {
    var url = el.getAttribute("data-live");
    var dot = document.querySelector(".live-dot");
    var es = new EventSource(url);
    es.addEventListener("open", function () { if (dot) { dot.classList.add("on"); dot.title = "live"; } });
    es.addEventListener("error", function () { if (dot) { dot.classList.remove("on"); dot.title = "reconnecting"; } });
    es.addEventListener("update", function (e) {
      var keep = openDetails(el);
      el.innerHTML = e.data;
      keep.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
      el.setAttribute("data-updated", String(Date.now()));
      el.dispatchEvent(new CustomEvent("polos:updated", { bubbles: true }));
    });
  }

  document.querySelectorAll("[data-live]").forEach(follow);

  document.addEventListener("click", function (e) {
    var b = e.target.closest("[data-load]");
    if (!b) return;
    e.preventDefault();
    b.disabled = true;
    b.textContent = "loading…";
    fetch(b.getAttribute("data-load"), { credentials: "same-origin" })
      .then(function (r) { return r.text().then(function (t) { return [r.ok, t]; }); })
      .then(function (res) {
        var pre = document.createElement("pre");
        pre.textContent = res[1];
        if (!res[0]) pre.className = "error-box";
        b.replaceWith(pre);
      })
      .catch(function (err) { b.textContent = "could not load: " + err; b.disabled = false; });
  });

  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  document.addEventListener("click", function (e) {
    var c = e.target.closest("[data-copy]");
    if (!c) return;
    var text = c.getAttribute("data-copy");
    if (navigator.clipboard) navigator.clipboard.writeText(text);
    c.textContent = "copied";
  });
})();
