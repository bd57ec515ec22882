package xdg

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDirs(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("XDG_STATE_HOME", "")
	c, err := ConfigHome()
	require.NoError(t, err)
	require.Equal(t, "/home/u/.config", c)
	s, err := StateHome()
	require.NoError(t, err)
	require.Equal(t, "/home/u/.local/state", s)

	t.Setenv("XDG_CONFIG_HOME", "/cfg")
	t.Setenv("XDG_STATE_HOME", "relative/dir") // ignored, as the spec says
	c, _ = ConfigHome()
	require.Equal(t, "/cfg", c)
	s, _ = StateHome()
	require.Equal(t, "/home/u/.local/state", s)

	t.Setenv("HOME", "")
	_, err = StateHome()
	require.ErrorContains(t, err, "no $XDG_STATE_HOME and no home directory")
}
