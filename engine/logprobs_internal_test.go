package engine

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestPushEventLogprobs checks that a delta's meta logprobs are decoded and merged with the
// unread delta of the same choice.
func TestPushEventLogprobs(t *testing.T) {
	s := newStream(nil, 1, 1000, SamplingParams{})
	tok := func(id int32) []byte { return binary.LittleEndian.AppendUint32(nil, uint32(id)) }
	s.pushEvent(&event{kind: evDelta, tokens: tok(7), text: []byte("a"),
		meta: []byte(`{"logprobs":[{"token":"a","logprob":-0.5,"bytes":[97],"top":[{"token":"a","logprob":-0.5,"bytes":[97]}]}]}`)})
	s.pushEvent(&event{kind: evDelta, tokens: tok(8), text: []byte("b"), finish: 1,
		meta: []byte(`{"logprobs":[{"token":"b","logprob":-9999,"bytes":[98]}]}`)})
	s.pushEvent(&event{kind: evDelta, index: 1, tokens: tok(9), text: []byte("c"), finish: 1})
	d, err := s.Recv()
	require.NoError(t, err)
	require.Equal(t, []int32{7, 8}, d.TokenIDs)
	require.Equal(t, "ab", d.Text)
	require.Equal(t, []TokenLogprob{
		{Token: "a", Logprob: -0.5, Bytes: []int{97}, Top: []TokenLogprob{{Token: "a", Logprob: -0.5, Bytes: []int{97}}}},
		{Token: "b", Logprob: -9999, Bytes: []int{98}},
	}, d.Logprobs)
	d, err = s.Recv()
	require.NoError(t, err)
	require.Equal(t, 1, d.Index)
	require.Nil(t, d.Logprobs)
}
