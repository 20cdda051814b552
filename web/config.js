// Deploy-time settings for the chat page. A deployment overwrites this file (e.g. uploads its own next to
// index.html); `?api=http://127.0.0.1:PORT/...` in the page URL overrides it for one visit, for an API on this
// computer only (app.js refuses any other host there); the local static server writes it from --api-base-url /
// WEB_API_BASE_URL.
window.QA_CONFIG = {
  // API Gateway stage URL, without a trailing slash: the page POSTs to `${apiBaseUrl}/ask`.
  apiBaseUrl: "http://127.0.0.1:3000/prod",
};
