"""Model components: 3D encoder, slice encoder, inter-slice transformer, TG-IS, Vote-MI, projectors, LLM."""
