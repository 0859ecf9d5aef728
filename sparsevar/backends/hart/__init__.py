"""HART-0.7B (mit-han-lab/hart): a next-scale transformer over a hybrid tokenizer whose last stage adds a
continuous residual from a small diffusion head. Own implementation; loads the official folders strictly."""
