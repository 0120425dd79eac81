"""Planning: the Plan types (what to build for a target, and why), backend/precision selection and the
search over measured candidates under budgets. Named `planning` so that `edgekit.plan` stays the API verb."""
