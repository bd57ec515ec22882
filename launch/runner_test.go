package launch_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/launch"
)

func TestCheckRunnerOptions(t *testing.T) {
	cases := []struct {
		name string
		opts launch.Options
		want string // "" means valid
	}{
		{"default", launch.Options{}, ""},
		{"generate", launch.Options{Runner: "generate"}, ""},
		{"pooling", launch.Options{Runner: "pooling"}, ""},
		{"pooling with convert embed", launch.Options{Runner: "pooling", Convert: "embed"}, ""},
		{"unknown runner", launch.Options{Runner: "draft"}, `--runner "draft"`},
		{"convert without pooling", launch.Options{Convert: "embed"}, "needs --runner pooling"},
		{"unknown convert", launch.Options{Runner: "pooling", Convert: "classify"}, `--convert "classify"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := launch.Check(tc.opts)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, launch.ErrBadOptions)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestResolveRunnerArgs(t *testing.T) {
	cases := []struct {
		name string
		opts launch.Options
		want map[string]any
	}{
		{"generate writes nothing", launch.Options{Engine: "vllm", Device: "cpu", Runner: "generate"}, map[string]any{}},
		{"vllm pooling", launch.Options{Engine: "vllm", Device: "cpu", Runner: "pooling", Convert: "embed"},
			map[string]any{"runner": "pooling", "convert": "embed"}},
		{"transformers pooling (AutoModel: no convert)", launch.Options{Engine: "transformers", Device: "cpu", Runner: "pooling", Convert: "embed"},
			map[string]any{"runner": "pooling"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := launch.Resolve(context.Background(), tc.opts, launch.Host{FindPython: python()})
			require.NoError(t, err)
			for _, k := range []string{"runner", "convert"} {
				v, ok := tc.want[k]
				got, has := p.EngineArgs[k]
				require.Equal(t, ok, has, "%s in %v", k, p.EngineArgs)
				require.Equal(t, v, got)
			}
		})
	}
}
