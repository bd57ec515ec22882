package engine_test

// This file's name sorts it after every other test file of the package: go test runs tests in
// file order, and TestEngineLifecycle closes the shared engine the others use.

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
)

// TestEngineLifecycle runs last: it closes the shared engine and opens others on the same
// interpreter (a failing start, an engine that dies).
func TestEngineLifecycle(t *testing.T) {
	_, err := engine.Open(context.Background(), scriptedConfig())
	require.ErrorIs(t, err, engine.ErrAlreadyStarted, "one engine at a time")

	require.NoError(t, shared.Close())
	shared = nil

	cfg := scriptedConfig()
	cfg.Extra = map[string]any{"fail_start": "no GPU today"}
	_, err = engine.Open(context.Background(), cfg)
	require.ErrorContains(t, err, "no GPU today")

	e, err := engine.Open(context.Background(), scriptedConfig())
	require.NoError(t, err)
	defer e.Close()
	hang, err := e.Generate(context.Background(), chat("hang", 0))
	require.NoError(t, err)
	s, err := e.Generate(context.Background(), chat("die:core process killed", 0))
	require.NoError(t, err)
	_, _, err = collect(t, s)
	require.Error(t, err)
	_, _, err = collect(t, hang)
	require.ErrorIs(t, err, engine.ErrEngineDead, "open streams fail when the engine dies")
	require.ErrorIs(t, e.Health(), engine.ErrEngineDead)
	require.ErrorContains(t, e.Health(), "core process killed")
	select {
	case <-e.Done():
	case <-time.After(time.Second):
		t.Fatal("Done is not closed after the engine died")
	}
	_, err = e.Generate(context.Background(), chat("count:1", 0))
	require.ErrorIs(t, err, engine.ErrEngineDead)
	require.NoError(t, e.Close())

	// Death while idle (no request to fail) is noticed by the bridge's health watchdog.
	e, err = engine.Open(context.Background(), scriptedConfig())
	require.NoError(t, err)
	defer e.Close()
	s, err = e.Generate(context.Background(), chat("sick:engine core killed", 0))
	require.NoError(t, err)
	text, _, err := collect(t, s)
	require.NoError(t, err)
	require.Equal(t, "ok", text)
	select {
	case <-e.Done():
	case <-time.After(time.Second):
		t.Fatal("an engine that died while idle was not noticed within a second")
	}
	require.ErrorContains(t, e.Health(), "engine core killed")
}
