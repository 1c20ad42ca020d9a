"""Speech output training with a frozen LLM: speech decoder + pre-network, prefix decoder, `say`, eval."""
