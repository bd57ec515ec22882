package engine_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
)

func TestOpenModelMissing(t *testing.T) {
	_, err := engine.Open(context.Background(), engine.Config{Model: "/nonexistent/model"})
	require.ErrorContains(t, err, "scripts/bootstrap")
}
