"""Schema-constrained decoding on xgrammar: vocabulary, schema checks, grammars, planner, processors."""
