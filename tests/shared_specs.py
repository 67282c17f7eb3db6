"""JSON schemas and tool definitions shared by the engine and API tests of structured outputs."""

# Every leaf is bounded (enums, integer ranges, maxLength, maxItems), so a model that talks noise
# still reaches the end of the object well within max_tokens.
SCHEMAS = {
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user"],
    },
    "array": {
        "type": "object",
        "properties": {
            "ids": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["ids"],
    },
    "number": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "n": {"type": "null"}},
        "required": ["x"],
    },
    "optional": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "string", "maxLength": 4},
            "c": {"enum": [1, "two", None]},
        },
        "required": ["a"],
    },
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 8},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 10},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query", "limit"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters: its arguments are {}
]
