// Sign in with the operator key: the server answers with an HttpOnly session cookie.
"use strict";
(function () {
  const form = document.getElementById("login");
  const error = document.getElementById("login-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const key = form.elements.key.value;
    let answer;
    try {
      answer = await fetch("/dashboard/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        credentials: "same-origin",
        body: JSON.stringify({ key: key }),
      });
    } catch (err) {
      error.textContent = "The service does not answer.";
      error.hidden = false;
      return;
    }
    if (answer.ok) {
      window.location.assign("/dashboard");
      return;
    }
    if (answer.status === 401) {
      error.textContent = "That is not the operator key.";
    } else if (answer.status === 429) {
      error.textContent = "Too many wrong keys: try again in " + answer.headers.get("Retry-After") + " seconds.";
    } else {
      error.textContent = "Sign-in failed (" + answer.status + ").";
    }
    error.hidden = false;
    form.elements.key.select();
  });
})();
