// The studio's HTTP API (docs/studio-api.md), as small functions.
// Every request is same-origin: the auth cookie travels with it, so the UI never sees a token.

/** An error whose message is meant for people (the server's `detail`). */
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// FastAPI's own validation errors put a list of {loc, msg} in `detail`; ours put a string.
function detailText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`)
      .join("; ");
  }
  return detail == null ? "" : JSON.stringify(detail);
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", ...options });
  } catch (err) {
    throw new ApiError(`The studio is not answering (${err.message}).`, 0);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    let message = detailText(body && body.detail) || `${response.status} ${response.statusText}`;
    if (response.status === 401 || response.status === 403) {
      message += " (open /?token=<your studio.token> once in this browser to sign in)";
    }
    throw new ApiError(message, response.status);
  }
  return body;
}

const q = (params) => new URLSearchParams(
  Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""),
).toString();

export const getOptions = () => request("/api/options");
export const getTokens = (prompt) => request(`/api/tokens?${q({ prompt })}`);
export const getNearest = (prompt, index, k = 8) =>
  request(`/api/tokens/nearest?${q({ prompt, index, k })}`);
export const getRun = (id) => request(`/api/runs/${encodeURIComponent(id)}`);
export const postRun = (body) => request("/api/runs", {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify(body),
});

// Image URLs: plain <img> loads, so they need no fetch() (the cookie goes along anyway).
const runPath = (id) => `/api/runs/${encodeURIComponent(id)}`;
export const imageUrl = (id) => `${runPath(id)}/image.png`;
export const previewUrl = (id, step) => `${runPath(id)}/preview/${step}.png`;
export const heatmapUrl = (id, token, step, block) =>
  `${runPath(id)}/heatmap.png?${q({ token, step, block })}`;

/** Why an <img> failed to load: its URL fetched once more to read the server's `detail`. */
export async function imageFailure(url) {
  try {
    await request(url);
    return "The image could not be decoded.";
  } catch (err) {
    return err.message;
  }
}
