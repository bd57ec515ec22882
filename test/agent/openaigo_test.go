package agent

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/shared"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// weatherParams is get_weather's parameters, as sdk_test.py's.
var weatherParams = shared.FunctionParameters{
	"type": "object",
	"properties": map[string]any{
		"city": map[string]any{"type": "string", "maxLength": 16},
		"unit": map[string]any{"type": "string", "enum": []string{"celsius", "fahrenheit"}},
	},
	"required":             []string{"city", "unit"},
	"additionalProperties": false,
}

var goTools = []openai.ChatCompletionToolUnionParam{
	openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{
		Name: "get_weather", Description: openai.String("Current weather in a city"), Parameters: weatherParams,
	}),
}

// requireWeatherArgs checks arguments against weatherParams: an object with exactly a city of
// at most 16 characters and a unit from the enum.
func requireWeatherArgs(t *testing.T, arguments string) {
	t.Helper()
	var args map[string]any
	require.NoError(t, json.Unmarshal([]byte(arguments), &args), "arguments %q", arguments)
	require.Len(t, args, 2, "arguments %q", arguments)
	city, ok := args["city"].(string)
	require.True(t, ok, "city in %q", arguments)
	require.LessOrEqual(t, len([]rune(city)), 16)
	require.Contains(t, []any{"celsius", "fahrenheit"}, args["unit"])
}

func chatCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func weatherRequest(choice openai.ChatCompletionToolChoiceOptionUnionParam) openai.ChatCompletionNewParams {
	return openai.ChatCompletionNewParams{
		Model:       model,
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("What is the weather in Paris?")},
		Tools:       goTools,
		ToolChoice:  choice,
		MaxTokens:   openai.Int(100),
		Temperature: openai.Float(0),
	}
}

var (
	required = openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}
	named    = openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "get_weather"})
)

func TestOpenAIGoForcedToolCalls(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		client := govtest.OpenAIClient(s.URL)
		for name, choice := range map[string]openai.ChatCompletionToolChoiceOptionUnionParam{"required": required, "named": named} {
			t.Run(name, func(t *testing.T) {
				resp, err := client.Chat.Completions.New(chatCtx(t), weatherRequest(choice))
				require.NoError(t, err)
				c := resp.Choices[0]
				require.Equal(t, "tool_calls", c.FinishReason)
				require.NotEmpty(t, c.Message.ToolCalls)
				for _, call := range c.Message.ToolCalls {
					require.Equal(t, "get_weather", call.Function.Name)
					require.NotEmpty(t, call.ID)
					requireWeatherArgs(t, call.Function.Arguments)
				}
			})
		}
	})
}

func TestOpenAIGoStreamedToolCallsAccumulate(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		client := govtest.OpenAIClient(s.URL)
		for name, choice := range map[string]openai.ChatCompletionToolChoiceOptionUnionParam{"required": required, "named": named} {
			t.Run(name, func(t *testing.T) {
				stream := client.Chat.Completions.NewStreaming(chatCtx(t), weatherRequest(choice))
				var acc openai.ChatCompletionAccumulator
				chunks := 0
				for stream.Next() {
					require.True(t, acc.AddChunk(stream.Current()))
					chunks++
				}
				require.NoError(t, stream.Err())
				require.Greater(t, chunks, 3, "the call was not streamed in pieces")
				c := acc.Choices[0]
				require.Equal(t, "tool_calls", c.FinishReason)
				require.NotEmpty(t, c.Message.ToolCalls) // "required" may call it more than once
				if name == "named" {
					require.Len(t, c.Message.ToolCalls, 1)
				}
				for _, call := range c.Message.ToolCalls {
					require.Equal(t, "get_weather", call.Function.Name)
					require.NotEmpty(t, call.ID)
					requireWeatherArgs(t, call.Function.Arguments)
				}
			})
		}
	})
}

func TestOpenAIGoJSONSchema(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		client := govtest.OpenAIClient(s.URL)
		resp, err := client.Chat.Completions.New(chatCtx(t), openai.ChatCompletionNewParams{
			Model:       model,
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather in Paris as JSON.")},
			MaxTokens:   openai.Int(100),
			Temperature: openai.Float(0),
			ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "weather", Schema: map[string]any(weatherParams), Strict: openai.Bool(true)},
			}},
		})
		require.NoError(t, err)
		require.Equal(t, "stop", resp.Choices[0].FinishReason)
		requireWeatherArgs(t, resp.Choices[0].Message.Content)
	})
}

func TestOpenAIGoToolResultRoundTrip(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		client := govtest.OpenAIClient(s.URL)
		first, err := client.Chat.Completions.New(chatCtx(t), weatherRequest(named))
		require.NoError(t, err)
		msg := first.Choices[0].Message
		require.Len(t, msg.ToolCalls, 1)
		call := msg.ToolCalls[0]
		params := openai.ChatCompletionNewParams{
			Model: model,
			Messages: []openai.ChatCompletionMessageParamUnion{
				openai.UserMessage("What is the weather in Paris?"),
				msg.ToParam(),
				openai.ToolMessage("22 degrees and sunny", call.ID),
			},
			Tools:       goTools,
			MaxTokens:   openai.Int(12),
			Temperature: openai.Float(0),
		}
		resp, err := client.Chat.Completions.New(chatCtx(t), params)
		require.NoError(t, err)
		require.NotEmpty(t, resp.Choices[0].Message.Content)
		require.Positive(t, resp.Usage.PromptTokens)
		// The tool result reached the prompt: without it, the prompt is shorter.
		params.Messages = slices.Delete(params.Messages, 1, 3)
		short, err := client.Chat.Completions.New(chatCtx(t), params)
		require.NoError(t, err)
		require.Greater(t, resp.Usage.PromptTokens, short.Usage.PromptTokens+10)
	})
}
