// dicom-node admin console: small progressive enhancements (the pages work without them).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Ask before destructive actions (cancel a job, remove a destination).
  document.querySelectorAll("[data-confirm]").forEach((button) => {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.getAttribute("data-confirm"))) event.preventDefault();
    });
  });
  // "+ another" adds an empty row to a list field (allowed calling AE titles, ...).
  document.querySelectorAll("button.add-row").forEach((button) => {
    button.addEventListener("click", () => {
      const list = document.getElementById(button.getAttribute("data-list"));
      const rows = list.querySelectorAll(".row");
      const row = rows[rows.length - 1].cloneNode(true);
      row.querySelectorAll(".error").forEach((e) => e.remove());
      const input = row.querySelector("input");
      input.value = "";
      list.insertBefore(row, button);
      input.focus();
    });
  });
  // Optional groups (e.g. TLS of a destination) are dimmed while switched off.
  document.querySelectorAll("input[data-toggles]").forEach((box) => {
    const group = document.getElementById(box.getAttribute("data-toggles"));
    const sync = () => group.classList.toggle("off", !box.checked);
    box.addEventListener("change", sync);
    sync();
  });
  // A page that reloads itself does not while someone types in it.
  const refresh = document.querySelector('meta[http-equiv="refresh"]');
  if (refresh) {
    document.addEventListener("focusin", () => refresh.remove(), { once: true });
  }
});
