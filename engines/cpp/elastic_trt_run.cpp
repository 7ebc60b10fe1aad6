// elastic_trt_run: load a TensorRT engine built by `elastic-export build --target trt`, prefill a
// prompt of token ids, run a greedy decode loop, print the tokens and tokens/s. No Python needed:
// the engine's SSM-scan plugin is the AOT form (compiled Triton kernels embedded in the engine).
//
// I/O naming (shared with engines/trt/engine.py): input `input_ids` [b, l] (int32 or int64), output
// `logits` [b, l, V]; each input `past_<s>` pairs with output `present_<s>` (states stay on the GPU).
// `attention_mask` (the exporter's graphs have it): [b, l] for prefill, [b, T] for decode with T all
// tokens so far (past + 1); the prompt is unpadded here, so it is a view of one device buffer of ones.
// Either one engine whose graph takes past states (profiles 0 = prefill with past length 0,
// 1 = decode), or a prefill engine (no past inputs) plus a decode engine.
//
//   elastic_trt_run --engine full.model.engine --prompt 1,17,42 --new-tokens 64
//   elastic_trt_run --prefill full.prefill.engine --decode full.decode.engine --prompt-len 512

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define CHECK_CUDA(call)                                                                          \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess)                                                                    \
            throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(e_));         \
    } while (0)

namespace {

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, char const* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
};

size_t elementSize(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: return 4;
        case nvinfer1::DataType::kHALF: return 2;
        case nvinfer1::DataType::kBF16: return 2;
        case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kINT64: return 8;
        case nvinfer1::DataType::kINT8: return 1;
        case nvinfer1::DataType::kBOOL: return 1;
        default: throw std::runtime_error("unsupported tensor data type");
    }
}

int64_t volume(nvinfer1::Dims const& d) {
    int64_t v = 1;
    for (int i = 0; i < d.nbDims; ++i) v *= d.d[i];
    return v;
}

float toFloat(void const* p, nvinfer1::DataType t, int64_t i) {
    if (t == nvinfer1::DataType::kFLOAT) return static_cast<float const*>(p)[i];
    uint16_t h = static_cast<uint16_t const*>(p)[i];
    if (t == nvinfer1::DataType::kBF16) {
        uint32_t bits = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    // IEEE half -> float
    uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign << 31;
        else {  // subnormal
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            bits = (sign << 31) | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = (sign << 31) | 0x7f800000 | (man << 13);
    else bits = (sign << 31) | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// A device buffer that only grows.
struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    void reserve(size_t n) {
        n = std::max<size_t>(n, 1);  // TensorRT wants a valid address even for empty tensors
        if (n <= bytes) return;
        if (ptr) CHECK_CUDA(cudaFree(ptr));
        CHECK_CUDA(cudaMalloc(&ptr, n));
        bytes = n;
    }
    ~Buffer() { if (ptr) cudaFree(ptr); }
};

std::string stateSuffix(std::string const& name, char const* prefix) {
    std::string p1 = std::string(prefix) + "_", p2 = std::string(prefix) + ".";
    if (name.rfind(p1, 0) == 0) return name.substr(p1.size());
    if (name.rfind(p2, 0) == 0) return name.substr(p2.size());
    return "";
}

struct Engine {
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts;  // one per profile
    std::vector<std::string> inputs, outputs;
    std::map<std::string, std::string> pastToPresent;  // past_<s> -> present_<s>
    std::map<std::string, Buffer> outBufs;
    bool hasMask = false;

    Engine(nvinfer1::IRuntime& runtime, std::string const& path, cudaStream_t stream) {
        std::ifstream f(path, std::ios::binary);
        if (!f) throw std::runtime_error("cannot open engine file " + path);
        std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        engine.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
        if (!engine) throw std::runtime_error("cannot deserialize " + path + " (TensorRT version mismatch, or a "
                                              "JIT-plugin engine: rebuild with the AOT plugin)");
        std::map<std::string, std::string> presents;
        for (int i = 0; i < engine->getNbIOTensors(); ++i) {
            std::string n = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(n.c_str()) == nvinfer1::TensorIOMode::kINPUT) inputs.push_back(n);
            else {
                outputs.push_back(n);
                std::string s = stateSuffix(n, "present");
                if (!s.empty()) presents[s] = n;
            }
        }
        for (auto const& n : inputs) {
            if (n == "input_ids") continue;
            if (n == "attention_mask") { hasMask = true; continue; }
            std::string s = stateSuffix(n, "past");
            if (s.empty() || !presents.count(s))
                throw std::runtime_error(path + ": input " + n + " is neither input_ids, attention_mask nor a past_* state");
            pastToPresent[n] = presents[s];
        }
        for (int p = 0; p < std::max(1, engine->getNbOptimizationProfiles()); ++p) {
            contexts.emplace_back(engine->createExecutionContext());
            if (!contexts.back()) throw std::runtime_error("cannot create an execution context");
            if (engine->getNbOptimizationProfiles() > 1) contexts.back()->setOptimizationProfileAsync(p, stream);
        }
    }

    // Bind inputs (name -> (device pointer, shape)), allocate outputs, run on `stream`.
    void run(int profile, std::map<std::string, std::pair<void*, nvinfer1::Dims>> const& feeds, cudaStream_t stream) {
        auto& ctx = *contexts.at(std::min<size_t>(profile, contexts.size() - 1));
        for (auto const& n : inputs) {
            auto const& fd = feeds.at(n);
            if (!ctx.setInputShape(n.c_str(), fd.second)) throw std::runtime_error("bad input shape for " + n);
            ctx.setTensorAddress(n.c_str(), fd.first);
        }
        for (auto const& n : outputs) {
            nvinfer1::Dims d = ctx.getTensorShape(n.c_str());
            auto& buf = outBufs[n];
            buf.reserve(volume(d) * elementSize(engine->getTensorDataType(n.c_str())));
            ctx.setTensorAddress(n.c_str(), buf.ptr);
        }
        if (!ctx.enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
    }

    nvinfer1::Dims outShape(int profile, std::string const& n) {
        return contexts.at(std::min<size_t>(profile, contexts.size() - 1))->getTensorShape(n.c_str());
    }
};

struct Args {
    std::string engine, prefill, decode;
    std::vector<int64_t> prompt;
    int promptLen = 0, newTokens = 32, batch = 1;
};

Args parse(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) throw std::runtime_error("missing value after " + k);
            return argv[++i];
        };
        if (k == "--engine") a.engine = next();
        else if (k == "--prefill") a.prefill = next();
        else if (k == "--decode") a.decode = next();
        else if (k == "--prompt") {
            std::stringstream ss(next());
            std::string tok;
            while (std::getline(ss, tok, ',')) a.prompt.push_back(std::stoll(tok));
        } else if (k == "--prompt-len") a.promptLen = std::stoi(next());
        else if (k == "--new-tokens") a.newTokens = std::stoi(next());
        else if (k == "--batch") a.batch = std::stoi(next());
        else throw std::runtime_error("unknown argument " + k);
    }
    if (a.engine.empty() && (a.prefill.empty() || a.decode.empty()))
        throw std::runtime_error("give --engine FILE, or --prefill FILE and --decode FILE");
    if (a.prompt.empty()) {
        int n = a.promptLen > 0 ? a.promptLen : 16;
        for (int i = 0; i < n; ++i) a.prompt.push_back(1 + (i * 7919) % 251);  // deterministic filler ids
    }
    return a;
}

nvinfer1::Dims dims(std::vector<int64_t> const& v) {
    nvinfer1::Dims d;
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
    return d;
}

}  // namespace

int main(int argc, char** argv) try {
    Args args = parse(argc, argv);
    Logger logger;
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));

    std::unique_ptr<Engine> unified, pre, dec;
    if (!args.engine.empty()) unified = std::make_unique<Engine>(*runtime, args.engine, stream);
    else {
        pre = std::make_unique<Engine>(*runtime, args.prefill, stream);
        dec = std::make_unique<Engine>(*runtime, args.decode, stream);
    }
    Engine& P = unified ? *unified : *pre;
    Engine& D = unified ? *unified : *dec;
    int const prefillProfile = 0, decodeProfile = unified ? 1 : 0;

    int const B = args.batch;
    int64_t const L = static_cast<int64_t>(args.prompt.size());
    bool const ids64 = P.engine->getTensorDataType("input_ids") == nvinfer1::DataType::kINT64;
    Buffer ids;
    auto uploadIds = [&](std::vector<int64_t> const& host, int64_t cols) {  // host: [B, cols] row-major
        size_t es = ids64 ? 8 : 4;
        std::vector<char> tmp(host.size() * es);
        for (size_t i = 0; i < host.size(); ++i) {
            if (ids64) reinterpret_cast<int64_t*>(tmp.data())[i] = host[i];
            else reinterpret_cast<int32_t*>(tmp.data())[i] = static_cast<int32_t>(host[i]);
        }
        ids.reserve(tmp.size());
        CHECK_CUDA(cudaMemcpyAsync(ids.ptr, tmp.data(), tmp.size(), cudaMemcpyHostToDevice, stream));
        return dims({B, cols});
    };

    // attention_mask: ones over every token this run can see, [B, L + newTokens] at most
    Buffer ones;
    bool const mask64 = !(P.hasMask || D.hasMask) ||
        (P.hasMask ? P : D).engine->getTensorDataType("attention_mask") == nvinfer1::DataType::kINT64;
    {
        size_t n = static_cast<size_t>(B) * static_cast<size_t>(L + args.newTokens), es = mask64 ? 8 : 4;
        std::vector<char> host(n * es);
        for (size_t i = 0; i < n; ++i) {
            if (mask64) reinterpret_cast<int64_t*>(host.data())[i] = 1;
            else reinterpret_cast<int32_t*>(host.data())[i] = 1;
        }
        ones.reserve(host.size());
        CHECK_CUDA(cudaMemcpyAsync(ones.ptr, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
    }

    // States: device buffers owned here, swapped with the engine's present outputs after each step.
    std::map<std::string, Buffer> states;
    std::map<std::string, nvinfer1::Dims> stateDims;
    auto takeStates = [&](Engine& E, int profile, Engine& next) {
        for (auto const& [past, present] : next.pastToPresent) {
            auto& src = E.outBufs.at(present);
            std::swap(states[past].ptr, src.ptr);
            std::swap(states[past].bytes, src.bytes);
            stateDims[past] = E.outShape(profile, present);
        }
    };
    auto argmaxLast = [&](Engine& E, int profile, int64_t cols) {
        nvinfer1::Dims d = E.outShape(profile, "logits");
        int64_t V = d.d[d.nbDims - 1];
        auto t = E.engine->getTensorDataType("logits");
        size_t es = elementSize(t);
        std::vector<char> host(V * es);
        std::vector<int64_t> next;
        for (int b = 0; b < B; ++b) {
            char const* row = static_cast<char const*>(E.outBufs.at("logits").ptr) + ((b * cols + cols - 1) * V) * es;
            CHECK_CUDA(cudaMemcpyAsync(host.data(), row, V * es, cudaMemcpyDeviceToHost, stream));
            CHECK_CUDA(cudaStreamSynchronize(stream));
            int64_t best = 0;
            float bv = toFloat(host.data(), t, 0);
            for (int64_t v = 1; v < V; ++v) {
                float x = toFloat(host.data(), t, v);
                if (x > bv) { bv = x; best = v; }
            }
            next.push_back(best);
        }
        return next;
    };

    // ---- prefill ----
    std::map<std::string, std::pair<void*, nvinfer1::Dims>> feeds;
    std::vector<int64_t> promptB;
    for (int b = 0; b < B; ++b) promptB.insert(promptB.end(), args.prompt.begin(), args.prompt.end());
    feeds["input_ids"] = {nullptr, uploadIds(promptB, L)};
    feeds["input_ids"].first = ids.ptr;
    if (P.hasMask) feeds["attention_mask"] = {ones.ptr, dims({B, L})};
    std::map<std::string, Buffer> emptyPast;
    for (auto const& [past, present] : P.pastToPresent) {  // unified graph: zero states, past length 0
        nvinfer1::Dims d = P.engine->getTensorShape(past.c_str());
        d.d[0] = B;
        for (int i = 1; i < d.nbDims; ++i) if (d.d[i] < 0) d.d[i] = 0;
        auto& buf = emptyPast[past];
        size_t bytes = volume(d) * elementSize(P.engine->getTensorDataType(past.c_str()));
        buf.reserve(bytes);
        CHECK_CUDA(cudaMemsetAsync(buf.ptr, 0, std::max<size_t>(bytes, 1), stream));
        feeds[past] = {buf.ptr, d};
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    auto t0 = std::chrono::steady_clock::now();
    P.run(prefillProfile, feeds, stream);
    std::vector<int64_t> tok = argmaxLast(P, prefillProfile, L);  // synchronizes
    double prefillS = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    takeStates(P, prefillProfile, D);  // prefill's present_* outputs become decode's past_* inputs

    // ---- greedy decode ----
    std::vector<int64_t> generated = {tok[0]};  // printed: the first sequence
    auto t1 = std::chrono::steady_clock::now();
    for (int step = 1; step < args.newTokens; ++step) {
        feeds.clear();
        feeds["input_ids"] = {nullptr, uploadIds(tok, 1)};
        feeds["input_ids"].first = ids.ptr;
        if (D.hasMask) feeds["attention_mask"] = {ones.ptr, dims({B, L + step})};  // past L + step - 1, + 1
        for (auto const& [past, present] : D.pastToPresent) feeds[past] = {states[past].ptr, stateDims[past]};
        D.run(decodeProfile, feeds, stream);
        tok = argmaxLast(D, decodeProfile, 1);
        generated.push_back(tok[0]);
        takeStates(D, decodeProfile, D);
    }
    double decodeS = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

    std::printf("tokens:");
    for (auto t : generated) std::printf(" %lld", static_cast<long long>(t));
    std::printf("\nprefill: %lld tokens x %d in %.2f ms (%.0f tokens/s)\n", static_cast<long long>(L), B,
                prefillS * 1e3, L * B / prefillS);
    if (args.newTokens > 1)
        std::printf("decode: %d steps x %d in %.2f ms (%.1f tokens/s)\n", args.newTokens - 1, B, decodeS * 1e3,
                    (args.newTokens - 1) * B / decodeS);
    CHECK_CUDA(cudaStreamDestroy(stream));
    return 0;
} catch (std::exception const& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
}
