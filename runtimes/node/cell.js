'use strict';
/*
 * Run one notebook cell inside a Hot Box with Node.js, the way a REPL would run it.
 *
 * Started by the %%hotbox magic as `node /opt/hotbox/node/cell.js` with the cell's code on stdin.
 * Node's own modules only, so any image with a `node` can run it.
 *
 * - `ctx` is the HOTCELL_INPUT payload (JSON) the notebook passed in with --in.
 * - The cell's completion value (its last expression statement, as in the REPL) becomes a `result`
 *   frame; `result(value)` sets it explicitly, which is the way to give one from code using
 *   top-level `await` (such code runs as the body of an async function; `return value` works too).
 * - `display(obj)` sends a MIME bundle ({"text/html": ...}), a string, or any value (shown inspected).
 * - An uncaught error prints its stack on stderr, sends an `error` frame and exits with code 1.
 *
 * Frames are ESC ] hotbox; <json> BEL on stdout (hotbox_jupyter/frames.py decodes them).
 */

const vm = require('vm');
const util = require('util');
const fs = require('fs');
const path = require('path');
const Module = require('module');

const FRAME_START = '\x1b]hotbox;';
const FRAME_END = '\x07';
const CELL_FILE = '<cell>';
const REPR_METHODS = [
  ['text/html', '_repr_html_'],
  ['text/markdown', '_repr_markdown_'],
  ['image/svg+xml', '_repr_svg_'],
  ['image/png', '_repr_png_'],
  ['application/json', '_repr_json_'],
];

function emit(frame) {
  // Through the same stream as console.log, so frames keep their place among the printed lines.
  let text;
  try {
    text = JSON.stringify(frame);
  } catch (err) {
    text = JSON.stringify({t: 'display', data: {'text/plain': `[hotbox] unserialisable output: ${err}`}});
  }
  process.stdout.write(FRAME_START + text + FRAME_END);
}

function jsonValue(value) {
  try {
    const text = JSON.stringify(value);
    return text === undefined ? null : JSON.parse(text);
  } catch (err) {
    return null;
  }
}

function isBundle(obj) {
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) return false;
  const keys = Object.keys(obj);
  return keys.length > 0 && keys.every((k) => k.includes('/'));
}

function mimeBundle(obj) {
  const data = {};
  if (obj !== null && (typeof obj === 'object' || typeof obj === 'function')) {
    if (typeof obj._repr_mimebundle_ === 'function') {
      try {
        Object.assign(data, obj._repr_mimebundle_());
      } catch (err) {
        process.stderr.write(`[hotbox] _repr_mimebundle_ failed: ${err}\n`);
      }
    }
    for (const [mime, name] of REPR_METHODS) {
      if (mime in data || typeof obj[name] !== 'function') continue;
      try {
        const got = obj[name]();
        if (got !== undefined && got !== null) data[mime] = Buffer.isBuffer(got) ? got.toString('base64') : got;
      } catch (err) {
        process.stderr.write(`[hotbox] ${name} failed: ${err}\n`);
      }
    }
  }
  if (!('text/plain' in data)) {
    data['text/plain'] = typeof obj === 'string' ? obj : util.inspect(obj, {depth: 4, colors: false});
  }
  return data;
}

function display(...objs) {
  let raw = false;
  const last = objs[objs.length - 1];
  if (objs.length > 1 && last && typeof last === 'object' && last.raw === true && Object.keys(last).length === 1) {
    raw = true;
    objs.pop();
  }
  for (const obj of objs) {
    emit({t: 'display', data: raw || isBundle(obj) ? obj : mimeBundle(obj), metadata: {}});
  }
}

let explicitResult;
let hasExplicitResult = false;
function result(value) {
  hasExplicitResult = true;
  explicitResult = value;
}

// The stack from the cell's frames on: the runner's own frames (vm, this file, the loader) are cut.
function userStack(err) {
  const lines = String((err && err.stack) || err).split('\n');
  const cut = lines.findIndex((line) => /^\s+at /.test(line) &&
    (line.includes(__filename) || /\(node:vm:|at new Script /.test(line)));
  return (cut < 0 ? lines : lines.slice(0, cut)).join('\n');
}

let failed = false;
function reportError(err) {
  failed = true;
  process.exitCode = 1;
  const stack = userStack(err);
  process.stderr.write(stack + '\n');
  emit({
    t: 'error',
    ename: (err && err.name) || 'Error',
    evalue: (err && err.message) || String(err),
    traceback: stack.split('\n'),
  });
}

function emitResult(value) {
  if (value === undefined) return;
  emit({t: 'result', value: jsonValue(value), data: mimeBundle(value)});
}

async function main() {
  const code = fs.readFileSync(0, 'utf8');
  let ctx;
  try {
    ctx = JSON.parse(process.env.HOTCELL_INPUT || '{}');
  } catch (err) {
    process.stderr.write(`[hotbox] HOTCELL_INPUT is not JSON: ${err.message}\n`);
    process.exitCode = 2;
    return;
  }
  // Modules resolve from the working directory, as they would for a script saved there.
  const cellRequire = Module.createRequire(path.join(process.cwd(), CELL_FILE));
  Object.assign(globalThis, {ctx, display, result, require: cellRequire, module: {exports: {}}});
  process.on('uncaughtException', reportError);
  process.on('unhandledRejection', reportError);

  let value;
  let script;
  try {
    script = new vm.Script(code, {filename: CELL_FILE});
  } catch (err) {
    if (!(err instanceof SyntaxError) || !/await/.test(err.message)) {
      reportError(err);
      return;
    }
    // Top-level await: the cell becomes the body of an async function (its completion value is lost).
    script = new vm.Script(`(async () => {${code}\n})()`, {filename: CELL_FILE});
  }
  try {
    value = script.runInThisContext({displayErrors: false});
    if (value && typeof value.then === 'function') value = await value;
  } catch (err) {
    reportError(err);
    return;
  }
  if (!failed) emitResult(hasExplicitResult ? explicitResult : value);
}

main().catch(reportError);
