// Progressive enhancement only: every page works without this script.
'use strict';
document.documentElement.classList.add('js');

// Destructive actions: forms with data-confirm ask first.
document.addEventListener('submit', (e) => {
  const message = e.target.dataset && e.target.dataset.confirm;
  if (message && !window.confirm(message)) e.preventDefault();
});

// File inputs with data-file-into fill the named textarea of their form (as text, or as
// base64 with data-base64), so users can pick a file instead of pasting its content.
document.addEventListener('change', (e) => {
  const input = e.target;
  if (!input.dataset || !input.dataset.fileInto || !input.files || !input.files[0]) return;
  const target = input.form && input.form.elements[input.dataset.fileInto];
  if (!target) return;
  const reader = new FileReader();
  if ('base64' in input.dataset) {
    reader.onload = () => { target.value = String(reader.result).replace(/^data:[^,]*,/, ''); };
    reader.readAsDataURL(input.files[0]);
  } else {
    reader.onload = () => { target.value = String(reader.result); };
    reader.readAsText(input.files[0]);
  }
});
