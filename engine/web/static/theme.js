// Loaded before the page is drawn (not deferred): the theme the toggle chose, without a flash.
try {
  const theme = localStorage.getItem("engine-theme");
  if (theme) document.documentElement.dataset.theme = theme;
} catch (e) { /* storage refused: the system's theme */ }
