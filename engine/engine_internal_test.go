package engine

import (
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// fakeEngine is an Engine whose shim accepts every command and does nothing: enough for
// Generate and the poller's handle, with no interpreter.
func fakeEngine() *Engine {
	return &Engine{
		api:       &shimAPI{send: func(int32, int64, *byte, int64) int32 { return 0 }},
		streams:   map[int64]*Stream{},
		statsWait: map[int64]chan Stats{},
		ready:     make(chan error, 1),
	}
}

// TestSecondReadyIsNoRace: a backend that reports READY twice updates the model info while
// readers call Model; run with -race.
func TestSecondReadyIsNoRace(t *testing.T) {
	e := fakeEngine()
	e.handle(&event{kind: evReady, meta: []byte(`{"model":"a","max_model_len":1}`)})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		e.handle(&event{kind: evReady, meta: []byte(`{"model":"b","max_model_len":2}`)})
	}()
	for i := 0; i < 100; i++ {
		m := e.Model()
		require.Contains(t, []string{"a", "b"}, m.ID)
	}
	wg.Wait()
	require.Equal(t, ModelInfo{ID: "b", MaxModelLen: 2}, e.Model())
	require.Equal(t, ModelInfo{}, fakeEngine().Model(), "no READY yet")
}

// TestRequestIDsAreProcessWide: two engines never hand out the same request id, so a late
// event of an earlier engine's request (a backend thread that outlived it) cannot be routed to
// a request of the next one.
func TestRequestIDsAreProcessWide(t *testing.T) {
	a, b := fakeEngine(), fakeEngine()
	seen := map[int64]bool{}
	for i := 0; i < 3; i++ {
		for _, e := range []*Engine{a, b} {
			s, err := e.Start(context.Background(), Request{Prompt: "x"})
			require.NoError(t, err)
			require.False(t, seen[s.ID()], "id %d handed out twice", s.ID())
			seen[s.ID()] = true
		}
	}
}
