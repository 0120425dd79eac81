"""Packaging: the package folder and its manifest, reports (markdown, HTML, SVG plots, the layer table),
archives, and comparing / gating packages. Named `packaging` so that `edgekit.package` stays the API verb."""
