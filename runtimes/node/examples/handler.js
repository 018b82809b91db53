// handler.js
exports.handle = async function(ctx) {
    const name = ctx.name || "world";
    console.log(`Processing ${name}`);          // goes to console_output
    return { greeting: `Hello, ${name}!` };     // goes to VmResult.result
};
