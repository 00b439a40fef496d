"""Training: the toy reasoning models (:mod:`.toy`), rollouts with forced answers
(:mod:`.rollouts`) and the marginal-value head (:mod:`.head`)."""
