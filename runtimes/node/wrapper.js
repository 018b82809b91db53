// Hotcell's Node.js runtime wrapper: run a handler function with JSON in and JSON out.
//
// As the seed describes it: require /opt/hotcell/handler.js, take its exported handle (or else main)
// function, sync or async, call it with the JSON payload of HOTCELL_INPUT (or of stdin when that
// variable is unset), and write its return value as JSON to /hotcell/result.json. console.log() is the
// console. A handler that throws gets its stack on stderr, a structured error in result.json
// ({"error": {"type", "message", "traceback"}}) and exit code 1; a missing handler or bad input exits 2.
//
// HOTCELL_HANDLER and HOTCELL_RESULT move the two files. No dependencies beyond node itself.
"use strict";

const fs = require("fs");
const path = require("path");

const HANDLER = process.env.HOTCELL_HANDLER || "/opt/hotcell/handler.js";
const RESULT = process.env.HOTCELL_RESULT || "/hotcell/result.json";

function writeResult(value) {
  fs.mkdirSync(path.dirname(RESULT), { recursive: true });
  const tmp = RESULT + ".tmp";
  fs.writeFileSync(tmp, JSON.stringify(value === undefined ? null : value));
  fs.renameSync(tmp, RESULT);
}

function fail(type, message, stack, code) {
  process.stderr.write(stack ? stack + "\n" : `hotcell: ${type}: ${message}\n`);
  try {
    writeResult({ error: { type, message, traceback: stack ? stack.split("\n") : [] } });
  } catch (err) {
    process.stderr.write(`hotcell: cannot write ${RESULT}: ${err.message}\n`);
  }
  return code === undefined ? 1 : code;
}

function readInput() {
  let raw = process.env.HOTCELL_INPUT;
  if (raw === undefined) {
    raw = process.stdin.isTTY ? "" : fs.readFileSync(0, "utf8");
  }
  return raw.trim() ? JSON.parse(raw) : {};
}

async function main() {
  let ctx;
  try {
    ctx = readInput();
  } catch (err) {
    return fail("InputError", `HOTCELL_INPUT is not JSON: ${err.message}`, null, 2);
  }
  if (!fs.existsSync(HANDLER)) {
    return fail("HandlerNotFound", `no handler at ${HANDLER}`, null, 2);
  }
  let fn;
  try {
    const mod = require(path.resolve(HANDLER));
    fn = typeof mod.handle === "function" ? mod.handle
      : typeof mod.main === "function" ? mod.main
      : typeof mod === "function" ? mod : null;
  } catch (err) {
    return fail(err && err.name || "Error", String(err && err.message || err), err && err.stack);
  }
  if (!fn) {
    return fail("HandlerNotFound", `${HANDLER} exports neither handle nor main`, null, 2);
  }
  let value;
  try {
    value = await fn(ctx);
  } catch (err) {
    const isErr = err instanceof Error;
    return fail(isErr ? err.name : "Error", isErr ? err.message : String(err), isErr ? err.stack : null);
  }
  let json;
  try {
    json = JSON.stringify(value === undefined ? null : value);
  } catch (err) {
    return fail("ResultError", `the handler's return value is not JSON: ${err.message}`);
  }
  if (json === undefined) {
    return fail("ResultError", "the handler's return value is not JSON");
  }
  writeResult(value);
  return 0;
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => { process.exitCode = fail("Error", String(err), err && err.stack); },
);
