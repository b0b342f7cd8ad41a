"""Many runs over one cache: sweeps, declarative pipelines and reports."""
