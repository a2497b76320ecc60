// Renders the $...$ / \[...\] math of the method pages when a MathJax script is available; offline the
// TeX source stays readable as it is.
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
