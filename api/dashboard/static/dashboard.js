// Baton dashboard: live regions fed by Server-Sent Events, and actions over the JSON API.
// The session cookie authenticates every call; unsafe ones carry the page's CSRF token.
(function () {
  "use strict";

  var FINAL = ["completed", "failed", "cancelled", "timeout"];
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function indicator(state) {
    document.querySelectorAll("[data-live-indicator]").forEach(function (el) {
      el.dataset.state = state;
      el.textContent = state === "live" ? "live" : state === "polling" ? "polling" : state === "done" ? "final" : "connecting";
    });
  }

  // ---- live regions ---------------------------------------------------------------------------

  function liveRegion(region) {
    var src = region.dataset.liveSrc;
    var eventsUrl = region.dataset.liveEvents;
    var minGap = parseInt(region.dataset.liveMinMs || "150", 10);
    var closeOnFinal = region.dataset.liveCloseOnFinal === "true";
    var pending = null, inFlight = false, again = false, lastAt = 0, source = null, pollTimer = null;

    function isFinal() {
      var body = region.querySelector("[data-final]");
      return body && body.dataset.final === "true";
    }

    function refresh() {
      if (inFlight) { again = true; return; }
      inFlight = true;
      lastAt = Date.now();
      var open = Array.prototype.map.call(region.querySelectorAll("details[open][id]"), function (d) { return d.id; });
      fetch(src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          if (r.status === 401 || r.redirected) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          region.innerHTML = html;
          // A step the reader had opened stays open across updates.
          open.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
          region.dispatchEvent(new CustomEvent("baton:updated", { bubbles: true }));
          if (isFinal() && closeOnFinal) stop("done");
        })
        .catch(function () { /* the next event or poll tries again */ })
        .then(function () {
          inFlight = false;
          if (again) { again = false; schedule(); }
        });
    }

    function schedule() {
      if (pending) return;
      var wait = Math.max(0, lastAt + minGap - Date.now());
      pending = setTimeout(function () { pending = null; refresh(); }, Math.max(wait, 50));
    }

    function stop(state) {
      if (source) { source.close(); source = null; }
      if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
      indicator(state);
    }

    function poll() {
      // Degraded mode: the event stream is unavailable, so ask again every few seconds.
      if (pollTimer || (closeOnFinal && isFinal())) return;
      window.__batonPolling = true;  // tests tell the degraded mode from the event stream
      indicator("polling");
      pollTimer = setInterval(function () {
        if (closeOnFinal && isFinal()) { stop("done"); return; }
        refresh();
      }, 2000);
    }

    if (closeOnFinal && isFinal()) { indicator("done"); return; }
    if (!eventsUrl || typeof EventSource === "undefined") { poll(); return; }
    var opened = false;
    source = new EventSource(eventsUrl, { withCredentials: true });
    source.onopen = function () { opened = true; indicator("live"); };
    function onEvent(e) {
      schedule();
      if (!closeOnFinal) return;
      try {
        var data = JSON.parse(e.data);
        if (e.type === "run" && FINAL.indexOf(data.status) >= 0) {
          // The server closes the stream after the final event; do not reconnect.
          if (source) { source.close(); source = null; }
          refresh();
        }
      } catch (err) { /* not JSON: just refresh */ }
    }
    source.addEventListener("run", onEvent);
    source.addEventListener("step", onEvent);
    source.onerror = function () {
      if (!source) return;
      if (!opened || source.readyState === EventSource.CLOSED) {
        source.close(); source = null;
        if (closeOnFinal && isFinal()) { indicator("done"); return; }
        poll();
      } else {
        indicator("connecting");
      }
    };
  }

  // ---- actions --------------------------------------------------------------------------------

  function showError(message) {
    var box = document.getElementById("action-error");
    var ok = document.getElementById("action-ok");
    if (ok) ok.hidden = true;
    if (box) { box.textContent = message; box.hidden = false; } else { window.alert(message); }
  }

  function showOk(message) {
    var box = document.getElementById("action-ok");
    var err = document.getElementById("action-error");
    if (err) err.hidden = true;
    if (box) { box.textContent = message; box.hidden = false; }
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return String(Date.now()) + Math.random().toString(16).slice(2);
  }

  // One Idempotency-Key per action until it succeeds, so a double click acts once.
  var keys = {};

  function api(method, path, body, action) {
    var headers = { "Accept": "application/json", "X-CSRF-Token": csrf };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (action) { keys[action] = keys[action] || newKey(); headers["Idempotency-Key"] = keys[action]; }
    return fetch(path, {
      method: method, credentials: "same-origin", headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return { success: false, error: { code: "HTTP_" + r.status, message: r.statusText } }; });
    }).then(function (envelope) {
      if (!envelope.success) {
        var e = envelope.error || {};
        throw new Error((e.code ? e.code + ": " : "") + (e.message || "request failed"));
      }
      if (action) delete keys[action];
      return envelope.data;
    });
  }

  function jsonObject(id, what) {
    var text = document.getElementById(id).value.trim() || "{}";
    var value;
    try { value = JSON.parse(text); } catch (err) { throw new Error(what + " is not valid JSON: " + err.message); }
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error(what + " must be a JSON object");
    return value;
  }

  function goToRun(id) { window.location.href = "/dashboard/runs/" + encodeURIComponent(id); }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]; });
  }

  function renderPlan(plan) {
    var box = document.getElementById("restart-plan");
    var reused = plan.reusedSteps.map(function (s) { return "<li><code>" + escapeHtml(s.stepId) + "</code> <span class=\"muted\">(" + escapeHtml(s.status) + ", reused)</span></li>"; }).join("");
    var run = plan.stepsToRun.map(function (s) { return "<li><code>" + escapeHtml(s) + "</code></li>"; }).join("");
    box.innerHTML = "<h4>Dry run: nothing was created</h4>" +
      "<div class=\"plan-grid\"><div><strong>Reused</strong><ul>" + (reused || "<li class=\"muted\">none</li>") + "</ul></div>" +
      "<div><strong>Will run</strong><ul id=\"plan-steps\">" + run + "</ul></div>" +
      "<div><strong>Input (v" + escapeHtml(plan.workflowVersion) + ")</strong><pre class=\"code\">" + escapeHtml(JSON.stringify(plan.input, null, 2)) + "</pre></div></div>";
    box.hidden = false;
  }

  function restartBody(dryRun) {
    var body = {
      fromStepId: document.getElementById("restart-step").value,
      overrideInput: jsonObject("restart-override", "overrideInput"),
      dryRun: dryRun
    };
    if (document.getElementById("restart-latest").checked) body.workflowVersion = "latest";
    return body;
  }

  var handlers = {
    cancel: function (runId) {
      return api("POST", "/api/v1/runs/" + runId + "/cancel", undefined, "cancel").then(function () { showOk("Cancellation requested."); });
    },
    retry: function (runId) {
      return api("POST", "/api/v1/runs/" + runId + "/retry", {}, "retry").then(function (d) { goToRun(d.newRunId); });
    },
    preview: function (runId) {
      return api("POST", "/api/v1/runs/" + runId + "/restart", restartBody(true)).then(renderPlan);
    },
    restart: function (runId) {
      return api("POST", "/api/v1/runs/" + runId + "/restart", restartBody(false), "restart").then(function (d) { goToRun(d.newRunId); });
    },
    approve: function (runId) {
      var data = jsonObject("resume-data", "Approval data");
      return api("POST", "/api/v1/runs/" + runId + "/resume", { approved: true, data: data }).then(function () { showOk("Approved."); });
    },
    reject: function (runId) {
      return api("POST", "/api/v1/runs/" + runId + "/resume", { approved: false }).then(function () { showOk("Rejected."); });
    },
    trigger: function (runId, workflowId) {
      var input = jsonObject("trigger-input", "Input");
      return api("POST", "/api/v1/workflows/" + encodeURIComponent(workflowId) + "/runs", { input: input, triggerType: "manual" }, "trigger")
        .then(function (d) { goToRun(d.id); });
    }
  };

  function bindActions() {
    document.querySelectorAll("[data-action]").forEach(function (button) {
      button.addEventListener("click", function (event) {
        event.preventDefault();
        var scope = button.closest("[data-run-id], [data-workflow-id]") || document.body;
        var runId = scope.dataset.runId, workflowId = scope.dataset.workflowId;
        button.disabled = true;
        var done = function () { button.disabled = false; };
        try {
          handlers[button.dataset.action](runId, workflowId).then(done, function (err) { showError(err.message); done(); });
        } catch (err) { showError(err.message); done(); }
      });
    });
  }

  // Actions that do not apply to the run's current status are hidden (and follow live updates).
  function syncActions() {
    var body = document.querySelector(".run-body[data-status]");
    if (!body) return;
    var status = body.dataset.status;
    document.querySelectorAll("#actions [data-when]").forEach(function (el) {
      el.hidden = el.dataset.when.split(" ").indexOf(status) < 0;
    });
    document.querySelectorAll("#actions .action-row").forEach(function (row) {
      row.hidden = !row.querySelector("[data-action]:not([hidden])");
    });
    var panel = document.getElementById("actions");
    if (panel) panel.hidden = !panel.querySelector("[data-when]:not([hidden])");
  }

  function checkOverride() {
    var area = document.getElementById("restart-override");
    var hint = document.getElementById("override-hint");
    if (!area || !hint) return;
    area.addEventListener("input", function () {
      try { jsonObject("restart-override", "overrideInput"); hint.textContent = ""; area.classList.remove("invalid"); }
      catch (err) { hint.textContent = err.message; area.classList.add("invalid"); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-src]").forEach(liveRegion);
    bindActions();
    syncActions();
    checkOverride();
    document.addEventListener("baton:updated", syncActions);
  });
})();
