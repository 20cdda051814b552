// Chat page: POST {question} to `${apiBaseUrl}/ask` and show the answer, the passages the model was shown
// (`sources`, collapsed under the answer), the variant that answered, the latency, and errors in plain words.
// The API path is buffered (API Gateway + Python Lambda cannot stream), so the page shows a pending state with
// an elapsed-time counter instead of streaming text. Everything the API sends is put on the page as text
// (textContent, text nodes), never as markup.
//
// Where the API key may go: the page's API is apiBaseUrl from config.js (set by whoever deploys the page), or
// `?api=` in the page address, which is accepted only when it names an API on this computer (a loopback host:
// localhost, *.localhost, 127.0.0.0/8, [::1]), so a link cannot point the page, and the key typed into it, at
// somebody else's server. The key is kept with the API origin it was entered for and is never sent to another
// one; requests do not follow redirects, which would carry the x-api-key header along.
"use strict";

(function () {
  const CLIENT_TIMEOUT_MS = 35000; // a little over API Gateway's 29 s integration timeout
  // The function already caps sources (10, 200 characters each); the page does not rely on it.
  const MAX_SOURCES = 10;
  const MAX_SOURCE_CHARS = 300;
  const KEY_STORAGE = "qa-chat.api-key"; // sessionStorage: {"origin": API origin it was entered for, "key"}

  const form = document.getElementById("ask-form");
  const question = document.getElementById("question");
  const send = document.getElementById("send");
  const status = document.getElementById("status");
  const elapsed = document.getElementById("elapsed");
  const formError = document.getElementById("form-error");
  const transcript = document.getElementById("transcript");
  const emptyNote = document.getElementById("empty-note");
  const apiKeyInput = document.getElementById("api-key");
  const variantInput = document.getElementById("variant");
  const retrievalInput = document.getElementById("retrieval");

  const { apiBase, refusedQuery } = resolveApiBase();
  const apiOrigin = apiBase ? new URL(apiBase).origin : "";
  document.getElementById("api-url").textContent = apiBase || "(not set)";
  document.getElementById("api-label").textContent = apiBase || "an API that is not configured yet";

  let pending = null; // {controller, timer, reason} while a question is in flight

  apiKeyInput.value = storedKeyFor(apiOrigin);
  apiKeyInput.addEventListener("input", () => {
    if (!apiKeyInput.value) sessionStorage.removeItem(KEY_STORAGE);
    else sessionStorage.setItem(KEY_STORAGE, JSON.stringify({ origin: apiOrigin, key: apiKeyInput.value }));
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    apiKeyInput.value = "";
    sessionStorage.removeItem(KEY_STORAGE);
    apiKeyInput.focus();
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "Escape" && pending) {
      event.preventDefault();
      pending.reason = "cancelled";
      pending.controller.abort();
    }
  });
  question.addEventListener("input", () => setFormError(""));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  if (refusedQuery) {
    setFormError(`The page address names an API that is not on this computer (${refusedQuery}), so it is ignored: ` +
      "?api= may only name localhost or 127.0.0.1. Another API is set in config.js.");
  }
  question.focus();

  // {apiBase, refusedQuery}: config.js's apiBaseUrl, or a loopback ?api=; a ?api= naming any other host is
  // refused (and reported), never used.
  function resolveApiBase() {
    const fromQuery = new URLSearchParams(window.location.search).get("api");
    const configured = (window.QA_CONFIG && window.QA_CONFIG.apiBaseUrl) || "";
    if (fromQuery) {
      const url = httpUrl(fromQuery);
      if (url && isLoopback(url.hostname)) return { apiBase: withoutTrailingSlash(url), refusedQuery: "" };
      const configuredUrl = httpUrl(configured);
      const apiBase = configuredUrl ? withoutTrailingSlash(configuredUrl) : "";
      return { apiBase, refusedQuery: fromQuery.slice(0, 100) };
    }
    const url = httpUrl(configured);
    return { apiBase: url ? withoutTrailingSlash(url) : "", refusedQuery: "" };
  }

  function httpUrl(text) {
    if (!text) return null;
    try {
      const url = new URL(text, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url : null;
    } catch (e) {
      return null;
    }
  }

  function withoutTrailingSlash(url) {
    return url.href.replace(/\/+$/, "");
  }

  // The URL parser has already normalised the host (lower case, IPv4 shorthands such as 127.1 or 0x7f.1
  // written out, IPv6 in brackets), so these comparisons see what the browser will connect to.
  function isLoopback(hostname) {
    return hostname === "localhost" || hostname.endsWith(".localhost") || hostname === "[::1]" ||
      /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(hostname);
  }

  function storedKeyFor(origin) {
    try {
      const stored = JSON.parse(sessionStorage.getItem(KEY_STORAGE) || "null");
      if (stored && stored.origin === origin && typeof stored.key === "string") return stored.key;
    } catch (e) {
      // an old plain-text entry, or garbage: not known to belong to this API
    }
    return "";
  }

  async function ask() {
    const text = question.value.trim();
    if (pending) {
      setFormError("Still waiting for the previous answer. Press Escape to cancel it.");
      return;
    }
    if (!text) {
      setFormError("Type a question first.");
      question.focus();
      return;
    }
    if (!apiBase) {
      setFormError("The API address is not configured: set apiBaseUrl in config.js or add ?api=… to the page address.");
      return;
    }
    setFormError("");

    const entry = addEntry(text);
    const started = performance.now();
    const controller = new AbortController();
    pending = {
      controller,
      reason: null,
      timer: setInterval(() => {
        elapsed.textContent = ((performance.now() - started) / 1000).toFixed(1) + " s";
      }, 100),
    };
    const timeout = setTimeout(() => {
      pending.reason = "timeout";
      controller.abort();
    }, CLIENT_TIMEOUT_MS);
    setBusy(true);

    const body = { question: text };
    const variant = variantInput.value.trim();
    if (variant) body.target_variant = variant;
    if (!retrievalInput.checked) body.retrieval = false;
    const headers = { "Content-Type": "application/json" };
    if (apiKeyInput.value) headers["x-api-key"] = apiKeyInput.value;

    let outcome;
    try {
      const response = await fetch(apiBase + "/ask", {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: controller.signal,
        credentials: "omit",
        cache: "no-store",
        redirect: "error", // a redirect would resend x-api-key to wherever it points
      });
      const payload = await readJson(response);
      const roundTripMs = performance.now() - started;
      if (response.ok && payload && typeof payload.answer === "string") {
        outcome = { ok: true, payload, roundTripMs };
      } else if (response.ok) {
        outcome = { ok: false, message: "The API answered, but not with an answer this page understands." };
      } else {
        outcome = { ok: false, message: plainError(response.status, payload) };
      }
    } catch (error) {
      if (pending.reason === "cancelled") {
        outcome = { ok: false, message: "Cancelled. The question was not answered." };
      } else if (pending.reason === "timeout") {
        outcome = { ok: false, message: `No answer after ${CLIENT_TIMEOUT_MS / 1000} s, so the page stopped waiting.` };
      } else {
        outcome = {
          ok: false,
          message: `Could not reach the API at ${apiBase}. Check that it is running and that it allows ` +
            "requests from this page (CORS).",
        };
      }
    } finally {
      clearTimeout(timeout);
      clearInterval(pending.timer);
      pending = null;
      setBusy(false);
    }

    if (outcome.ok) {
      showAnswer(entry, outcome.payload, outcome.roundTripMs);
      question.value = "";
      status.textContent = "Answer received.";
    } else {
      showError(entry, outcome.message);
      status.textContent = "The question failed; it is still in the box so you can try again.";
    }
    question.focus();
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (e) {
      return null;
    }
  }

  // API Gateway's own answers carry {"message"}; the function's carry {"error", "error_type"}.
  function plainError(statusCode, payload) {
    const detail = payload && (payload.error || payload.message);
    const known = {
      400: `The question was not accepted${detail ? ": " + detail : ""} (400).`,
      403: "The API refused the request: the API key is missing or not accepted (403). " +
        "Enter a key under Connection settings.",
      404: "The API has no /ask route at this address (404). Check the API base URL.",
      405: "The API does not accept this kind of request (405).",
      413: `The question is too long${detail ? ": " + detail : ""} (413).`,
      429: "Too many questions right now. Wait a moment and try again (429).",
      500: "The API failed while handling the question (500).",
      502: "The model endpoint is not available right now (502).",
      503: "The model endpoint is temporarily unavailable. Try again in a minute (503).",
      504: "The model took too long to answer (504).",
    };
    return known[statusCode] || `The request failed with status ${statusCode}${detail ? ": " + detail : ""}.`;
  }

  function addEntry(text) {
    emptyNote.hidden = true;
    const item = document.createElement("li");
    item.className = "entry";
    const q = document.createElement("p");
    q.className = "question";
    const qLabel = document.createElement("span");
    qLabel.className = "visually-hidden";
    qLabel.textContent = "You asked: ";
    q.append(qLabel, document.createTextNode(text));
    const waiting = document.createElement("p");
    waiting.className = "pending";
    waiting.textContent = "Waiting for the model…";
    item.append(q, waiting);
    transcript.append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showAnswer(item, payload, roundTripMs) {
    item.querySelector(".pending").remove();
    const answer = document.createElement("p");
    answer.className = "answer";
    const label = document.createElement("span");
    label.className = "visually-hidden";
    label.textContent = "Answer: ";
    answer.append(label, document.createTextNode(payload.answer || "(the model returned an empty answer)"));
    const meta = document.createElement("p");
    meta.className = "meta";
    const parts = [];
    parts.push(`Variant: ${payload.variant || "unknown"}`);
    if (typeof payload.latency_ms === "number") parts.push(`model ${formatMs(payload.latency_ms)}`);
    parts.push(`round trip ${formatMs(roundTripMs)}`);
    meta.textContent = parts.join(" · ");
    item.append(answer);
    const sources = sourceList(payload.sources);
    if (sources) item.append(sources);
    item.append(meta);
    item.scrollIntoView({ block: "end" });
  }

  // <details class="sources"> (closed) with "Sources (N)" and one list item per well-formed source, or null
  // when there are none. Title and source are set as text: they come from the model's index, not from us.
  function sourceList(raw) {
    if (!Array.isArray(raw)) return null;
    const entries = raw
      .filter((s) => s && typeof s.title === "string" && typeof s.source === "string" && s.title && s.source)
      .slice(0, MAX_SOURCES);
    if (entries.length === 0) return null;
    const details = document.createElement("details");
    details.className = "sources";
    const summary = document.createElement("summary");
    summary.textContent = `Sources (${entries.length})`;
    const list = document.createElement("ol");
    for (const entry of entries) {
      const li = document.createElement("li");
      const title = document.createElement("span");
      title.className = "source-title";
      title.textContent = clip(entry.title);
      const ref = document.createElement("span");
      ref.className = "source-ref";
      ref.textContent = clip(entry.source);
      li.append(title, ref);
      list.append(li);
    }
    details.append(summary, list);
    return details;
  }

  function clip(text) {
    return text.length <= MAX_SOURCE_CHARS ? text : text.slice(0, MAX_SOURCE_CHARS - 1) + "…";
  }

  function showError(item, message) {
    item.querySelector(".pending").remove();
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message;
    item.append(error);
    item.scrollIntoView({ block: "end" });
  }

  function formatMs(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function setBusy(busy) {
    form.setAttribute("aria-busy", String(busy));
    send.disabled = busy;
    send.textContent = busy ? "Waiting…" : "Ask";
    if (busy) status.textContent = "Waiting for the model…";
    elapsed.textContent = "";
  }

  function setFormError(message) {
    formError.textContent = message;
    question.setAttribute("aria-invalid", message ? "true" : "false");
  }
})();
