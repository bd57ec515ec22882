package engine

// TokenizeWaiting is the number of tokenize round trips waiting for the bridge (for tests).
func TokenizeWaiting(e *Engine) int { return e.tokenizing.pending() }
