// Sign-in page: confirm the identity of a token parked by /login?token=..., or paste a token.
"use strict";

async function signIn(body) {
  const r = await fetch("/api/login", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  location.href = "/";
}

window.addEventListener("DOMContentLoaded", async () => {
  const status = document.querySelector("#status");
  const st = await (await fetch("/api/login", {credentials: "same-origin"})).json();
  if (st.user) status.textContent = `signed in as ${st.user}`;
  if (st.pending) {
    document.querySelector("#pending").hidden = false;
    for (const id of ["#pending-name", "#pending-name2"]) document.querySelector(id).textContent = st.pending.name;
    document.querySelector("#pending-role").textContent = st.pending.role;
    document.querySelector("#continue").onclick = () => signIn({}).catch((e) => { status.textContent = e.message; });
  }
  document.querySelector("#paste").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = new FormData(ev.target).get("token").trim();
    signIn({token}).catch((e) => { status.textContent = e.message; });
  });
});
