/*
 * One QMP conversation exercising every protocol case: negotiation mode,
 * envelope errors, argument errors, JSON syntax errors, the dialect (single
 * quotes, several values per line, one value over several lines), id echo of
 * every JSON kind. Each step is bytes to send and the exact reply lines
 * expected, in qemu-storage-daemon 7.2's words; "$VERSION" stands for the
 * server's own version object. The end-to-end tests replay it over every
 * transport and the differential test replays it against qemu-storage-daemon.
 */

export interface ProtocolStep {
  name: string;
  send: string | Buffer;
  expect: string[];
}

const negotiationHint = "Expecting capabilities negotiation with 'qmp_capabilities'";
const error = (desc: string, id?: string) =>
  id === undefined
    ? `{"error": {"class": "GenericError", "desc": "${desc}"}}`
    : `{"id": ${id}, "error": {"class": "GenericError", "desc": "${desc}"}}`;

export const NEGOTIATION_STEPS: ProtocolStep[] = [
  {
    name: 'a command before negotiation',
    send: '{"execute": "query-version", "id": 1}',
    expect: [`{"id": 1, "error": {"class": "CommandNotFound", "desc": "${negotiationHint}"}}`],
  },
  {
    name: 'an unknown command before negotiation',
    send: '{"execute": "no-such-cmd"}',
    expect: [`{"error": {"class": "CommandNotFound", "desc": "${negotiationHint}"}}`],
  },
  {
    name: 'exec-oob before negotiation',
    send: '{"exec-oob": "query-version", "id": 2}',
    expect: [error("QMP input member 'exec-oob' is unexpected", '2')],
  },
  {
    name: 'an unknown capability',
    send: '{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": 3}',
    expect: [error("Parameter 'null' does not accept value 'bogus'", '3')],
  },
  {
    name: 'capabilities of the wrong type',
    send: '{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 4}',
    expect: [error("Invalid parameter type for 'enable', expected: array", '4')],
  },
  {
    name: 'a capability list element of the wrong type',
    send: '{"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": 5}',
    expect: [error("Invalid parameter type for 'enable[0]', expected: string", '5')],
  },
  {
    name: 'an unexpected argument to qmp_capabilities',
    send: '{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": 6}',
    expect: [error("Parameter 'foo' is unexpected", '6')],
  },
  {
    name: 'negotiation',
    send: '{"execute": "qmp_capabilities", "id": "neg"}',
    expect: ['{"return": {}, "id": "neg"}'],
  },
];

export const COMMAND_MODE_STEPS: ProtocolStep[] = [
  {
    name: 'negotiating twice',
    send: '{"execute": "qmp_capabilities", "id": 7}',
    expect: ['{"id": 7, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}'],
  },
  {
    name: 'arguments are checked before the negotiation state',
    send: '{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 8}',
    expect: [error("Invalid parameter type for 'enable', expected: array", '8')],
  },
  { name: 'query-version', send: '{"execute": "query-version", "id": 9}', expect: ['{"return": $VERSION, "id": 9}'] },
  { name: 'a command without id', send: '{"execute": "query-version"}', expect: ['{"return": $VERSION}'] },
  {
    name: 'an unknown command',
    send: '{"execute": "no-such-cmd", "id": 10}',
    expect: ['{"id": 10, "error": {"class": "CommandNotFound", "desc": "The command no-such-cmd has not been found"}}'],
  },
  {
    name: 'no dash/underscore aliasing',
    send: '{"execute": "qmp-capabilities", "id": 11}',
    expect: ['{"id": 11, "error": {"class": "CommandNotFound", "desc": "The command qmp-capabilities has not been found"}}'],
  },
  {
    name: 'an argument to a command that takes none',
    send: '{"execute": "query-version", "arguments": {"foo": 1}, "id": 12}',
    expect: [error("Parameter 'foo' is unexpected", '12')],
  },
  {
    name: 'a non-string command name',
    send: '{"execute": 42, "id": 13}',
    expect: [error("QMP input member 'execute' must be a string", '13')],
  },
  {
    name: 'arguments that are not an object',
    send: '{"execute": "query-version", "arguments": [], "id": 14}',
    expect: [error("QMP input member 'arguments' must be an object", '14')],
  },
  {
    name: 'null arguments',
    send: '{"execute": "query-version", "arguments": null}',
    expect: [error("QMP input member 'arguments' must be an object")],
  },
  {
    name: 'an unexpected request member',
    send: '{"execute": "query-version", "foo": true, "id": 15}',
    expect: [error("QMP input member 'foo' is unexpected", '15')],
  },
  {
    name: 'exec-oob without the oob capability',
    send: '{"exec-oob": "query-commands", "id": 16}',
    expect: [error("QMP input member 'exec-oob' is unexpected", '16')],
  },
  { name: 'no execute member', send: '{"id": 17}', expect: [error("QMP input lacks member 'execute'", '17')] },
  { name: 'an empty object', send: '{}', expect: [error("QMP input lacks member 'execute'")] },
  { name: 'an array', send: '[1, 2]', expect: [error('QMP input must be a JSON object')] },
  { name: 'a string', send: '"hello"', expect: [error('QMP input must be a JSON object')] },
  { name: 'a number, ended by a newline', send: '42\n', expect: [error('QMP input must be a JSON object')] },
  { name: 'null, ended by a space', send: 'null ', expect: [error('QMP input must be a JSON object')] },
  { name: 'a missing value', send: '{"execute": }', expect: [error('JSON parse error, expecting value')] },
  { name: 'a trailing comma', send: '{"execute": "query-version",}', expect: [error('JSON parse error, expecting value')] },
  { name: 'a stray closing brace', send: '}', expect: [error('JSON parse error, expecting value')] },
  {
    name: 'a bad keyword',
    send: '{"id": tru}',
    expect: [error("JSON parse error, invalid keyword 'tru'")],
  },
  {
    name: 'a duplicate key',
    send: '{"execute": "query-version", "execute": "query-version"}',
    expect: [error('JSON parse error, duplicate key')],
  },
  {
    name: 'a control byte, then resynchronisation',
    send: Buffer.from('{"execute": \x01}\n', 'latin1'),
    expect: [error("JSON parse error, stray '\\u0001'"), error('JSON parse error, expecting value')],
  },
  {
    name: 'a 0xFF byte',
    send: Buffer.from([0xff, 0x0a]),
    expect: [error("JSON parse error, stray '\\uFFFD'")],
  },
  {
    name: 'a raw newline inside a string',
    send: '{"execute": "unterminated\n}\n',
    expect: [error("JSON parse error, stray '\\\"unterminated\\n'"), error('JSON parse error, expecting value')],
  },
  {
    name: 'invalid UTF-8 in a string',
    send: Buffer.concat([Buffer.from('{"execute": "'), Buffer.from([0xc3, 0x28]), Buffer.from('"}')]),
    expect: [error('JSON parse error, invalid UTF-8 sequence in string')],
  },
  {
    name: 'a lone surrogate escape',
    send: '{"execute": "\\uD800"}',
    expect: [error('JSON parse error, \\\\uD800 is not a valid Unicode character')],
  },
  {
    name: 'nesting beyond 1024 levels',
    send: `{"id": ${'['.repeat(1030)}`,
    expect: [error('JSON nesting depth limit exceeded')],
  },
  {
    name: 'what follows a too deep value is parsed afresh',
    send: `${']'.repeat(6)}}\n`,
    expect: [error('QMP input must be a JSON object'), error('JSON parse error, expecting value')],
  },
  {
    name: 'single-quoted strings',
    send: "{'execute':'query-version','id':'it\\'s'}",
    expect: ['{"return": $VERSION, "id": "it\'s"}'],
  },
  {
    name: 'several requests on one line',
    send: '{"execute":"query-version","id":"a"}{"execute":"query-version","id":"b"}\n',
    expect: ['{"return": $VERSION, "id": "a"}', '{"return": $VERSION, "id": "b"}'],
  },
  {
    name: 'one request over several lines',
    send: '{\n  "execute":\n    "query-version",\n  "id": "ml"\n}\n',
    expect: ['{"return": $VERSION, "id": "ml"}'],
  },
  {
    name: 'uint64 and int64 ids echo exactly',
    send: '{"execute":"query-version","id":18446744073709551615}{"execute":"query-version","id":-9223372036854775808}',
    expect: ['{"return": $VERSION, "id": 18446744073709551615}', '{"return": $VERSION, "id": -9223372036854775808}'],
  },
  {
    name: 'float ids are re-serialised as QEMU prints doubles',
    send: '{"execute":"query-version","id":[1.5e3, -0.0, 0.1, 1e300, -1.25e-7, 123456789012345678901234567890]}',
    expect: ['{"return": $VERSION, "id": [1500, -0, 0.10000000000000001, 1.0000000000000001e+300, -1.2499999999999999e-07, 1.2345678901234568e+29]}'],
  },
  {
    name: 'object ids keep members in QEMU order',
    send: '{"execute":"query-version","id":{"b":1,"a":[true,false,null],"id":{}}}',
    expect: ['{"return": $VERSION, "id": {"a": [true, false, null], "b": 1, "id": {}}}'],
  },
  {
    name: 'null id',
    send: '{"execute":"query-version","id":null}',
    expect: ['{"return": $VERSION, "id": null}'],
  },
  {
    name: 'non-ASCII ids come back escaped',
    send: '{"execute":"query-version","id":"é😀\\u0000/\\u007f"}',
    expect: ['{"return": $VERSION, "id": "\\u00E9\\uD83D\\uDE00\\u0000/\\u007F"}'],
  },
];

/** QEMU's and blockd's version objects differ; both become $VERSION. */
export function normaliseVersion(line: string): string {
  return line.replace(/\{"qemu": \{"micro": \d+, "minor": \d+, "major": \d+\}, "package": "[^"]*"\}/g, '$VERSION');
}
